"""Few-step generation: consistency models (distillation, training, iCT), progressive distillation,
stochastic interpolants and reflow, MeanFlow.

``consistency`` holds the consistency-model core (boundary parameterization, grids, curricula,
targets, distances, weights, the loss); the multistep consistency sampler is registered with the
samplers as ``"consistency"``; ``trainers`` plugs them into ``diffax.train`` (``config.trainer``).
"""

from diffax.fewstep import consistency, interpolants, meanflow, progressive
from diffax.fewstep.consistency import (
    ConsistencySpec,
    boundary_scalings,
    consistency_function,
    consistency_loss,
    distance,
    karras_sigmas,
    scaled_denoiser,
    teacher_step,
)

__all__ = [
    "ConsistencySpec",
    "boundary_scalings",
    "consistency",
    "interpolants",
    "meanflow",
    "progressive",
    "consistency_function",
    "consistency_loss",
    "distance",
    "karras_sigmas",
    "scaled_denoiser",
    "teacher_step",
]
