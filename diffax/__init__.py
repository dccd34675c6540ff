"""diffax: diffusion models in JAX/Flax.

The functional core (schedules, forward process, parameterizations, losses), sampling, inversion and
likelihood are re-exported here; ``diffax.schedules``, ``diffax.losses``, ``diffax.samplers``,
``diffax.guidance``, ``diffax.inversion``, ``diffax.models`` and ``diffax.evaluation`` are public modules too,
as is ``diffax.discrete`` (categorical diffusion over tokens).
"""

from diffax import (
    adjoint,
    discrete,
    evaluation,
    guidance,
    inversion,
    likelihood,
    losses,
    models,
    parameterization,
    process,
    samplers,
    schedule_search,
    schedules,
    superposition,
    svdd,
)
from diffax.likelihood import log_likelihood
from diffax.losses import make_loss
from diffax.parameterization import PREDICTIONS, convert, edm_preconditioning, from_x0_eps, to_x0_eps
from diffax.process import q_posterior, q_posterior_discrete, q_sample, q_step, q_transition
from diffax.samplers import invert, sample, timesteps
from diffax.schedules import Schedule

__version__ = "0.1.0"

__all__ = [
    "PREDICTIONS",
    "adjoint",
    "Schedule",
    "convert",
    "discrete",
    "edm_preconditioning",
    "evaluation",
    "from_x0_eps",
    "guidance",
    "invert",
    "inversion",
    "likelihood",
    "log_likelihood",
    "losses",
    "make_loss",
    "models",
    "parameterization",
    "process",
    "q_posterior",
    "q_posterior_discrete",
    "q_sample",
    "q_step",
    "q_transition",
    "sample",
    "samplers",
    "schedule_search",
    "schedules",
    "superposition",
    "svdd",
    "timesteps",
    "to_x0_eps",
]
