"""The sampler registry: name -> factory of a ``Sampler`` (or ``AdaptiveSampler``) from its options."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from diffax.samplers._base import Sampler
from diffax.samplers.bdia import bdia
from diffax.samplers.consistency import consistency
from diffax.samplers.ddpm_ddim import ddim, ddpm
from diffax.samplers.dpm_solver import multistep, singlestep
from diffax.samplers.dpm_solver_v3 import dpm_solver_v3
from diffax.samplers.edm import euler, heun
from diffax.samplers.interpolant import interpolant_sde
from diffax.samplers.ode import AdaptiveSampler, ode
from diffax.samplers.pndm import plms, pndm
from diffax.samplers.sde import euler_maruyama, pc
from diffax.samplers.unipc import unipc

__all__ = ["REGISTRY", "SAMPLERS", "get"]


def _euler_ancestral(*, eta: float = 1.0) -> Sampler:
    """k-diffusion's ancestral Euler: DDIM with eta = 1 by default (see ``ddim``)."""
    return ddim(eta=eta)


def _dpm_solver_sde(*, order: int = 2) -> Sampler:
    """SDE-DPM-Solver++(2M) (order 1 is DDPM's posterior step)."""
    return multistep(order, sde=True)


def _fixed(factory: Callable[..., Sampler], *args: Any, **kwargs: Any) -> Callable[[], Sampler]:
    """A factory without options: ``factory(*args, **kwargs)``."""
    return lambda: factory(*args, **kwargs)


REGISTRY: dict[str, Callable[..., Sampler | AdaptiveSampler]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "euler_ancestral": _euler_ancestral,
    "dpm_solver_1": _fixed(singlestep, 1, data=False),
    "dpm_solver_2": _fixed(singlestep, 2, data=False),
    "dpm_solver_3": _fixed(singlestep, 3, data=False),
    "dpm_solver++_2s": _fixed(singlestep, 2, data=True),
    "dpm_solver++_2m": _fixed(multistep, 2),
    "dpm_solver++_3m": _fixed(multistep, 3),
    "dpm_solver++_sde": _dpm_solver_sde,
    "dpm_solver_v3": dpm_solver_v3,
    "unipc": unipc,
    "pndm": pndm,
    "plms": plms,
    "bdia": bdia,
    "euler_maruyama": euler_maruyama,
    "pc": pc,
    "ode": ode,
    "consistency": consistency,
    "interpolant_sde": interpolant_sde,
}

SAMPLERS: tuple[str, ...] = tuple(REGISTRY)


def get(name: str, **options: Any) -> Sampler | AdaptiveSampler:
    """The sampler called ``name`` with its options (e.g. ``get("ddim", eta=1.0)``).

    Raises:
      ValueError: for an unknown name (listing the known ones) or an option the sampler does not take.
    """
    if name not in REGISTRY:
        raise ValueError(f"Unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}.")
    factory = REGISTRY[name]
    accepted = tuple(inspect.signature(factory).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"Sampler {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'no options'}."
        )
    return factory(**options)
