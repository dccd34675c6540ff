"""The digits autoencoder of the embedded latent demo: the LDM recipe at 32×32, 4× downsampling.

    python -m diffax.main --config=experiments/digits_vae.py --workdir=runs/digits_vae

scikit-learn's digits upsampled to 32×32 are encoded to 8×8×4 latents by a small ``AutoencoderKL``
(kl-f4 layout: two stride-2 levels, one residual block each, no attention) trained with the LDM
``contperceptual`` loss (``diffax.autoencoding``): L1 summed over pixels with a learned
log-variance, KL weight 1e-6, a PatchGAN (2 layers, 32 channels) with hinge loss and the adaptive
weight from halfway on; Adam with betas (0.5, 0.9) for both networks. No perceptual term (LPIPS
weights do not ship). It logs held-out PSNR at the end (``eval/psnr``) and writes reconstruction
grids of held-out digits to ``runs/digits_vae/samples/``. Then cache the latents and train the
latent model: ``experiments/digits_latent.py``.

Measured (2026-12-06, seed 0, a 2-core machine at load 10-12): 719 CPU-seconds (user + sys; 49 min
wall beside other jobs), held-out PSNR 41.52 dB (34.90 dB at step 600, before the discriminator); the
reconstructions of the 297 held-out digits meet all seven digits targets (judge FD 1.00x floor,
49.4% near-zero pixels as the real digits). Width 16 keeps it near 0.5 CPU-s per step; the cosine
decay and the 1000 steps are what a 225-step constant-rate run lacked (25.8 dB, grey backgrounds).
"""

import ml_collections

from diffax.autoencoding import system
from experiments import common


def get_config(arg=None):
    del arg
    config = common.base_config()
    config.seed = 0
    config.total_steps = 1000
    config.model = common.model(
        "autoencoder_kl_f4",
        image_channels=1,
        latent_channels=4,
        base_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        norm_groups=8,
        mid_attention=False,
        scaling_factor=1.0,
    )
    loss = dict(system.LOSS_DEFAULTS, disc_start=800, disc_layers=2, disc_channels=32)
    config.loss = ml_collections.ConfigDict(dict(name=system.LOSS_NAME, **loss))
    config.input.dataset = "digits"
    config.input.upsample = 4
    config.input.image_size = 32
    config.input.channels = 1
    config.input.batch_size = 32

    config.optim.name = "adam"
    config.optim.lr = 1e-3
    config.optim.b1 = 0.5
    config.optim.b2 = 0.9
    config.optim.grad_clip = 0.0
    config.optim.warmup_steps = 0
    config.optim.decay = "cosine"  # to a tenth: the last steps refine the strokes and the black background
    config.optim.min_lr_ratio = 0.1
    config.ema.decays = ()

    config.evals.heldout_split = "test"
    config.evals.batch_size = 100
    config.ckpt.every_steps = 200
    config.ckpt.keep = 2
    config.log.every_steps = 50
    config.log.sample_every_steps = 500
    config.log.num_samples = 64
    config.log.eval_every_steps = config.total_steps
    return config
