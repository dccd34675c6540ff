"""Post-training quantization of diffusion networks (W8A8, W4A8), calibrated on the sampler's own
trajectories: PTQ4DM, Q-Diffusion (with shortcut splitting), TFMQ-DM, EDA-DM and a single-timestep
control, optionally with BRECQ block reconstruction of AdaRound's learned rounding; fake-quantized
and int8 execution of the same state; Orbax checkpoints of it."""

from diffax.quantization._calibration import (
    CALIBRATIONS,
    calibrate,
    calibration_set,
    is_temporal,
    load,
    per_step_mse,
    record_trajectories,
    save,
)
from diffax.quantization._model import QuantizedModel, QuantSpec, capture_inputs, unet_skip_splits
from diffax.quantization._reconstruction import learn_rounding, reconstruct, tdac_step_counts

__all__ = [
    "CALIBRATIONS",
    "QuantSpec",
    "QuantizedModel",
    "calibrate",
    "calibration_set",
    "capture_inputs",
    "is_temporal",
    "learn_rounding",
    "load",
    "per_step_mse",
    "reconstruct",
    "record_trajectories",
    "save",
    "tdac_step_counts",
    "unet_skip_splits",
]
