"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 3 and App. C): power-function EMA profiles, their snapshots, and the least-squares
reconstruction of an EMA of any length after training.

A power-function EMA averages the parameters seen up to time ``t`` with the profile
``p_t(τ) = (γ + 1) τ^γ / t^(γ + 1)`` on ``[0, t]`` (eq. 3); its relative standard deviation is
``σ_rel = sqrt((γ + 1) / ((γ + 2)^2 (γ + 3)))`` (eq. 4). Time is measured in training images, so one
update that sees ``B`` images at total ``t`` multiplies the average by ``β = (1 - B / t)^(γ + 1)``
(eq. 5 with ``Δt = B``): the weight each update gets is then exactly the profile's integral over the
images of that update. Training tracks a few profiles (config ``ema.std_rels``; EDM2 uses 0.05 and
0.10) and the training loop writes them at every checkpoint step into
``DIR/ema_snapshots/<step>/`` (never deleted). Afterwards any ``σ_rel`` at the newest snapshot's time
is the combination ``Σ x_i θ̂_i`` of the snapshots whose profiles best fit the target's in L2
(App. C.2): ``A x = b`` with the closed-form inner products of power functions.

CLI (writes the reconstructed parameters as an Orbax pytree)::

    python -m diffax.posthoc_ema --workdir=DIR --std_rel=0.05 --out=DIR/posthoc_0.050
"""

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

SNAPSHOT_DIR = "ema_snapshots"


def std_rel_from_gamma(gamma: float) -> float:
    """σ_rel of the power-function profile with exponent γ (Karras et al. 2024, eq. 4)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_from_std_rel(std_rel: float) -> float:
    """The exponent γ > -1 whose profile has relative std ``std_rel`` (the inverse of eq. 4).

    Squaring eq. 4 gives the cubic ``σ² (γ + 2)² (γ + 3) - (γ + 1) = 0``; σ_rel falls monotonically on
    the branch γ ≥ 0 used in practice, and its root there is the largest real one.

    Raises:
      ValueError: for ``std_rel`` outside (0, 0.2887), the range of γ ≥ 0 (γ = 0: a uniform average).
    """
    if not 0.0 < std_rel < std_rel_from_gamma(0.0):
        raise ValueError(f"std_rel {std_rel} must be in (0, {std_rel_from_gamma(0.0):.4f}) (gamma >= 0).")
    s2 = std_rel * std_rel
    roots = np.roots([s2, 7.0 * s2, 16.0 * s2 - 1.0, 12.0 * s2 - 1.0])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_beta(gamma: float, images: jax.Array, batch_images: int) -> jax.Array:
    """The averaging factor ``(1 - B / t)^(γ + 1)`` of the update that brings the image count to ``t``.

    Args:
      gamma: the profile's exponent.
      images: float32 scalar, images seen including this update's ``B = batch_images``.
      batch_images: images per update.
    """
    return jnp.exp((gamma + 1.0) * jnp.log1p(-batch_images / images))


def profile(gamma: float, t: float, tau: np.ndarray) -> np.ndarray:
    """The power-function profile ``(γ + 1) τ^γ / t^(γ + 1)`` on ``[0, t]``, zero after ``t`` (eq. 3)."""
    tau = np.asarray(tau, np.float64)
    return np.where(tau <= t, (gamma + 1.0) * np.power(tau / t, gamma) / t, 0.0)


def profile_inner_products(
    times_a: np.ndarray, gammas_a: np.ndarray, times_b: np.ndarray, gammas_b: np.ndarray
) -> np.ndarray:
    """``∫ p_a(τ) p_b(τ) dτ`` for every pair of profiles (a rows, b columns), in closed form.

    Over ``[0, min(t_a, t_b)]`` the product is ``(γ_a + 1)(γ_b + 1) τ^(γ_a + γ_b) / (t_a^(γ_a+1)
    t_b^(γ_b+1))``, whose integral is ``(γ_a + 1)(γ_b + 1) m^(γ_a + γ_b + 1) / ((γ_a + γ_b + 1)
    t_a^(γ_a+1) t_b^(γ_b+1))`` with ``m = min(t_a, t_b)``, evaluated in logs (App. C.2).
    """
    ta, ga = (np.asarray(v, np.float64)[:, None] for v in (times_a, gammas_a))
    tb, gb = (np.asarray(v, np.float64)[None, :] for v in (times_b, gammas_b))
    m = np.minimum(ta, tb)
    log_value = (ga + gb + 1.0) * np.log(m) - (ga + 1.0) * np.log(ta) - (gb + 1.0) * np.log(tb)
    return (ga + 1.0) * (gb + 1.0) / (ga + gb + 1.0) * np.exp(log_value)


def reconstruction_coefficients(
    times: Sequence[float], gammas: Sequence[float], *, target_time: float, target_gamma: float
) -> np.ndarray:
    """Weights ``x`` of the snapshots whose combined profile best fits the target's in L2 (App. C.2).

    Solves ``A x = b`` (least squares) with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``, then
    rescales ``x`` to sum to 1 so the combination averages (every profile integrates to 1).

    Args:
      times: each snapshot's time in images.
      gammas: each snapshot's exponent.
      target_time: the time of the EMA to reconstruct (typically the newest snapshot's).
      target_gamma: its exponent (:func:`gamma_from_std_rel`).

    Returns:
      float64 ``(num_snapshots,)`` weights.
    """
    a = profile_inner_products(times, gammas, times, gammas)
    b = profile_inner_products(times, gammas, [target_time], [target_gamma])[:, 0]
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / np.sum(x)


def response_l2_error(
    coefficients: np.ndarray,
    times: Sequence[float],
    gammas: Sequence[float],
    *,
    target_time: float,
    target_gamma: float,
) -> float:
    """``||Σ x_i p_i - p_target||_2 / ||p_target||_2``, exactly, from the closed-form inner products."""
    x = np.asarray(coefficients, np.float64)
    a = profile_inner_products(times, gammas, times, gammas)
    b = profile_inner_products(times, gammas, [target_time], [target_gamma])[:, 0]
    c = profile_inner_products([target_time], [target_gamma], [target_time], [target_gamma])[0, 0]
    return float(np.sqrt(max(x @ a @ x - 2.0 * x @ b + c, 0.0) / c))


def accumulate(total: Any, snapshots: Sequence[Any], coefficients: Sequence[float]) -> Any:
    """``total + Σ x_i θ_i`` over parameter pytrees in float32 (``total=None`` starts from zero)."""
    for weight, tree in zip(coefficients, snapshots, strict=True):
        scaled = jax.tree.map(lambda p, w=float(weight): w * jnp.asarray(p, jnp.float32), tree)
        total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
    return total


# -- snapshots on disk ---------------------------------------------------------------------------------


def tracked_profiles(config: ml_collections.ConfigDict) -> tuple[int, tuple[float, ...]]:
    """Where the power-function EMAs start in ``TrainState.ema_params``, and their σ_rel values."""
    return len(config.ema.decays), tuple(float(s) for s in config.ema.std_rels)


def save_snapshot(workdir: str, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
    """Writes the power-function EMAs of ``state`` (after ``step`` updates) to ``DIR/ema_snapshots/<step>``.

    A no-op when the run tracks none or the step is already written; every process calls it (Orbax
    writes sharded arrays collectively).
    """
    first, std_rels = tracked_profiles(config)
    path = os.path.abspath(os.path.join(workdir, SNAPSHOT_DIR, f"{step:010d}"))
    if not std_rels or os.path.exists(path):
        return
    images = np.asarray(step * config.input.batch_size, np.int64)
    tree = {"params": tuple(state.ema_params[first:]), "images": images}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)


def snapshot_steps(workdir: str) -> list[int]:
    """The steps of the complete snapshots of a run, oldest first."""
    directory = os.path.join(workdir, SNAPSHOT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if re.fullmatch(r"\d{10}", name))


def reconstruct_from_workdir(
    workdir: str,
    config: ml_collections.ConfigDict,
    params_like: Any,
    *,
    std_rel: float,
    step: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The parameters of a power-function EMA with ``std_rel`` at the run's newest snapshot (or ``step``).

    Args:
      workdir: the run directory.
      config: the run's config (its ``ema.std_rels`` name the tracked profiles).
      params_like: a parameter pytree (arrays or ``jax.ShapeDtypeStruct`` with shardings) to restore into.
      std_rel: the EMA length to reconstruct.
      step: a snapshot step to reconstruct at, from the snapshots up to it (default: the newest).

    Returns:
      ``(params, info)``; ``info`` holds the snapshot steps, images, coefficients and the response's
      relative L2 error.

    Raises:
      FileNotFoundError: when the run wrote no snapshots.
    """
    _, std_rels = tracked_profiles(config)
    steps = snapshot_steps(workdir)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"--workdir={workdir}: no post-hoc EMA snapshot of step {step}.")
        steps = [s for s in steps if s <= step]
    if not std_rels or not steps:
        raise FileNotFoundError(
            f"--workdir={workdir}: no post-hoc EMA snapshots in {SNAPSHOT_DIR}/; train with "
            "--config.ema.std_rels=0.05,0.1 to track them."
        )
    gammas = [gamma_from_std_rel(s) for s in std_rels]
    target_gamma = gamma_from_std_rel(std_rel)
    times = [float(steps_i * config.input.batch_size) for steps_i in steps]
    all_times = np.repeat(times, len(gammas))
    all_gammas = np.tile(gammas, len(times))
    coefficients = reconstruction_coefficients(
        all_times, all_gammas, target_time=times[-1], target_gamma=target_gamma
    )
    target = {
        "params": tuple(params_like for _ in std_rels),
        "images": np.asarray(0, np.int64),
    }
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    total = None
    with ocp.StandardCheckpointer() as checkpointer:  # one snapshot in memory at a time
        for i, step in enumerate(steps):
            tree = checkpointer.restore(os.path.join(workdir, SNAPSHOT_DIR, f"{step:010d}"), abstract)
            total = accumulate(total, tree["params"], coefficients[i * len(gammas) : (i + 1) * len(gammas)])
    params = jax.tree.map(lambda s, leaf: s.astype(leaf.dtype), total, params_like)
    info = dict(
        std_rel=std_rel,
        steps=steps,
        images=times,
        coefficients=coefficients.tolist(),
        response_l2_error=response_l2_error(
            coefficients, all_times, all_gammas, target_time=times[-1], target_gamma=target_gamma
        ),
    )
    return params, info


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory written by diffax.main.", required=True)
    flags.DEFINE_float("std_rel", None, "EMA length to reconstruct, as sigma_rel.", required=True)
    flags.DEFINE_string("out", None, "Orbax directory to write the parameters to.", required=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        gamma_from_std_rel(FLAGS.std_rel)
    except ValueError as e:
        raise app.UsageError(f"--std_rel: {e}") from None
    from diffax import checkpoint, sharding, train_state
    from diffax import config as config_lib

    checkpoint.quiet_orbax_logs()
    config = config_lib.load(FLAGS.workdir)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices())
    state, _ = checkpoint.restore_latest(FLAGS.workdir, config, train_state.build(config), mesh=mesh)
    params, info = reconstruct_from_workdir(FLAGS.workdir, config, state.params, std_rel=FLAGS.std_rel)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(FLAGS.out), params)
    with open(os.path.abspath(FLAGS.out) + ".json", "w") as f:
        json.dump(info, f, indent=2)
    logging.info(
        "wrote sigma_rel=%g from %d snapshots (response L2 error %.2e) to %s",
        FLAGS.std_rel,
        len(info["steps"]),
        info["response_l2_error"],
        FLAGS.out,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
