"""Samplers: every reverse-process solver as a pure init/step pair, each run as one jitted program.

``sample(model_fn, schedule, x_T, sampler=name, timesteps=ts, prediction=...)`` drives any sampler of
``SAMPLERS`` with one ``lax.scan`` (or diffrax for ``"ode"``); ``timesteps`` builds the grid;
``invert`` runs a deterministic sampler backwards; ``get`` returns a sampler's init/step pair and its
declared order, evaluations per step and stochasticity.
"""

from diffax.samplers._base import Sampler, dynamic_threshold, make_denoiser
from diffax.samplers._registry import SAMPLERS, get
from diffax.samplers._sample import invert, sample
from diffax.samplers._timesteps import INTEGER_SPACINGS, SPACINGS, timesteps
from diffax.samplers.ode import AdaptiveSampler, probability_flow

__all__ = [
    "INTEGER_SPACINGS",
    "SAMPLERS",
    "SPACINGS",
    "AdaptiveSampler",
    "Sampler",
    "dynamic_threshold",
    "get",
    "invert",
    "make_denoiser",
    "probability_flow",
    "sample",
    "timesteps",
]
