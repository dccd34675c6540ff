"""diffax: diffusion models in JAX/Flax.

The functional core (schedules, forward process, parameterizations, losses) is re-exported here;
``diffax.schedules``, ``diffax.losses`` and ``diffax.parameterization`` are public modules too.
"""

from diffax import evaluation, losses, models, parameterization, process, schedules
from diffax.losses import make_loss
from diffax.parameterization import PREDICTIONS, convert, edm_preconditioning, from_x0_eps, to_x0_eps
from diffax.process import q_posterior, q_posterior_discrete, q_sample, q_step, q_transition
from diffax.schedules import Schedule

__version__ = "0.1.0"

__all__ = [
    "PREDICTIONS",
    "Schedule",
    "convert",
    "edm_preconditioning",
    "evaluation",
    "from_x0_eps",
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
    "schedules",
    "to_x0_eps",
]
