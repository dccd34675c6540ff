"""The probability-flow ODE and its adaptive solution with diffrax.

dx/dt = f(t) x - g(t)^2 / 2 score(x, t) = f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t): the ODE whose
marginals equal the diffusion's (Song et al. 2021, eq. 13). Adaptive Runge-Kutta (Tsit5, Dopri5, Dopri8)
with a PID step-size controller integrates it between the first and last entry of ``ts``; the grid in
between is not used.

References: Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 13 and App. D.2;
Tsitouras 2011; Dormand & Prince 1980; Söderlind 2002 (PID step control); Kidger 2021 (diffrax).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from diffax.samplers._base import Denoiser
from diffax.schedules import Schedule

__all__ = ["AdaptiveSampler", "ode", "probability_flow", "solve_adaptive", "SOLVERS"]

# name -> (diffrax solver class name, order, evaluations of the field per attempted step). Tsit5 and
# Dopri5 reuse their last stage as the next first one (FSAL); Dopri8 does not. One more evaluation
# starts the solve. These counts are checked against a counting vector field in
# tests/samplers/test_api.py. diffrax itself (with equinox and optimistix, 0.6 s) is imported by the
# first solve: every ``python -m diffax.*`` process imports this module, few integrate adaptively.
SOLVERS = {
    "tsit5": ("Tsit5", 5, 6),
    "dopri5": ("Dopri5", 5, 6),
    "dopri8": ("Dopri8", 8, 13),
}
_SETUP_EVALUATIONS = 1


class AdaptiveSampler(NamedTuple):
    """A sampler that integrates from ts[0] to ts[-1] with its own step control.

    Attributes:
      solve: ``solve(denoise, schedule, x, t0, t1) -> (x1, info)`` with ``info["nfe"]``.
      order: the order of the Runge-Kutta scheme.
      stochastic: always False.
      data_prediction: always False (the vector field uses eps).
      min_steps: 1.
    """

    solve: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    order: int
    stochastic: bool = False
    data_prediction: bool = False
    min_steps: int = 1


def probability_flow(denoise: Denoiser, schedule: Schedule) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The probability-flow drift ``(t, x) -> f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t)``.

    References: Song et al. 2021, eq. 13.
    """

    def drift(t: jax.Array, x: jax.Array) -> jax.Array:
        eps = denoise(x, t)[1]
        f = schedule.drift(t).astype(x.dtype)
        coef = (0.5 * schedule.diffusion_sq(t) / schedule.sigma(t)).astype(x.dtype)
        return f * x + coef * eps

    return drift


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"Unknown ODE solver {solver!r}; known solvers: {', '.join(SOLVERS)}.")


def solve_adaptive(
    vector_field: Callable[[jax.Array, jax.Array], jax.Array],
    y0,
    t0: jax.Array,
    t1: jax.Array,
    *,
    solver: str,
    rtol: float,
    atol: float,
    max_steps: int,
):
    """Integrates dy/dt = vector_field(t, y) from t0 to t1 (either direction) with diffrax.

    Returns:
      ``(y1, info)``; ``info`` holds ``nfe`` (evaluations of the field), ``num_steps``,
      ``num_rejected_steps`` and ``successful``. A failed solve (e.g. ``max_steps`` reached) returns NaN
      rather than raising through a host callback, which would pin the state to one device.
    """
    import diffrax

    _check_solver(solver)
    solver_name, _, stages = SOLVERS[solver]
    solver_cls = getattr(diffrax, solver_name)

    def solve(y0, t0, t1):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: vector_field(t, y)),
            solver_cls(),
            t0=t0,
            t1=t1,
            dt0=None,
            y0=y0,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps,
            saveat=diffrax.SaveAt(t1=True),
            throw=False,
        )
        attempted = jnp.asarray(sol.stats["num_steps"], jnp.int32)
        successful = sol.result == diffrax.RESULTS.successful
        info = {
            "nfe": stages * attempted + _SETUP_EVALUATIONS,
            "num_steps": attempted,
            "num_rejected_steps": jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
            "successful": successful,
        }
        y1 = jax.tree_util.tree_map(lambda y: jnp.where(successful, y[-1], jnp.nan), sol.ys)
        return y1, info

    # The step-size controller contracts over the whole state, which explicitly sharded axes refuse:
    # run the solve with those axes automatic, giving the state back with its sharding.
    mesh = jax.typeof(jax.tree_util.tree_leaves(y0)[0]).sharding.mesh
    explicit = tuple(
        name for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True) if kind == AxisType.Explicit
    )
    if not explicit:
        return solve(y0, t0, t1)
    specs = jax.tree_util.tree_map(lambda y: jax.typeof(y).sharding.spec, y0)
    replicated = {key: PartitionSpec() for key in ("nfe", "num_steps", "num_rejected_steps", "successful")}
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(solve, axes=explicit, out_sharding=(specs, replicated))(y0, t0, t1)


def ode(*, solver: str = "tsit5", rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096):
    """Adaptive probability-flow ODE sampling.

    Args:
      solver: ``"tsit5"``, ``"dopri5"`` or ``"dopri8"``.
      rtol: relative tolerance of the PID controller.
      atol: absolute tolerance.
      max_steps: the most steps diffrax may take; beyond, the sample is NaN and
        ``info["successful"]`` False.

    Returns:
      An ``AdaptiveSampler``.
    """
    _check_solver(solver)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0; got {value}.")
    if int(max_steps) != max_steps or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer; got {max_steps}.")

    def solve(denoise, schedule, x, t0, t1):
        drift = probability_flow(denoise, schedule)
        return solve_adaptive(drift, x, t0, t1, solver=solver, rtol=rtol, atol=atol, max_steps=int(max_steps))

    return AdaptiveSampler(solve=solve, order=SOLVERS[solver][1])
