"""Training the KL autoencoder of latent diffusion (the LDM ``contperceptual`` recipe).

``losses``: the objective's pure functions; ``PatchDiscriminator``; ``lpips``: the perceptual term's
network, from a local weights file; ``system``: the run's state, train step, reconstructions and PSNR
evaluation, plugged into ``diffax.train``.
"""

from diffax.autoencoding import losses, lpips, system
from diffax.autoencoding.discriminator import PatchDiscriminator
from diffax.autoencoding.system import AutoencoderState, is_autoencoder_run, psnr

__all__ = [
    "AutoencoderState",
    "PatchDiscriminator",
    "is_autoencoder_run",
    "losses",
    "lpips",
    "psnr",
    "system",
]
