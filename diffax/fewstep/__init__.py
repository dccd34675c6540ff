"""Few-step generation: consistency models (distillation, training, iCT).

``consistency`` holds the consistency-model core (boundary parameterization, grids, curricula,
targets, distances, weights, the loss); the multistep consistency sampler is registered with the
samplers as ``"consistency"``.
"""

from diffax.fewstep import consistency
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
    "consistency_function",
    "consistency_loss",
    "distance",
    "karras_sigmas",
    "scaled_denoiser",
    "teacher_step",
]
