"""The embedded latent demo: a small DiT on the 8×8×4 latents of the digits VAE, decoded to 32×32.

    python -m diffax.main --config=experiments/digits_vae.py --workdir=runs/digits_vae      # 1. VAE
    python -m diffax.latent --config=experiments/digits_latent.py                            # 2. cache
    python -m diffax.main --config=experiments/digits_latent.py --workdir=runs/digits_latent # 3. model
    python -m diffax.generate --workdir=runs/digits_latent --num_samples=64 --out=grid.png   # 4. decode

Step 2 encodes the digits train split once (posterior mean and log-variance, ``runs/digits_latent_cache``)
and stores the latent scale 1/std; step 3 draws a fresh posterior sample per step, trains DiT-S-sized
blocks (4 deep, width 192, patch 2: 16 tokens) with the pixel default's diffusion recipe, and decodes
its samples through the frozen VAE for the grids and the digits metrics of both judges. Point
``--config.vae.workdir`` and ``--config.input.data_dir`` elsewhere to use another VAE run and cache
(or ``--config.vae.pretrained=FOLDER`` for a diffusers AutoencoderKL).
"""

from experiments import common


def get_config(arg=None):
    del arg
    config = common.base_config()
    config.seed = 0
    config.total_steps = 2000

    config.process.name = "cosine"
    config.process.num_timesteps = 1000
    config.model = common.model(
        "dit_s_2",
        depth=4,
        hidden_size=192,
        num_heads=3,
        num_classes=None,
        label_dropout=0.0,
        learned_variance=False,
    )
    config.loss.name = "simple"
    config.loss.prediction = "eps"
    config.loss.weighting = "min_snr"
    config.sampler.name = "dpm_solver++_2m"
    config.sampler.steps = 25
    config.sampler.spacing = "uniform_logsnr"

    config.vae.workdir = "runs/digits_vae"
    config.vae.source.dataset = "digits"
    config.vae.source.split = "train"
    config.vae.source.upsample = 4
    config.input.dataset = "latents"
    config.input.data_dir = "runs/digits_latent_cache"
    config.input.image_size = 8
    config.input.channels = 4
    config.input.batch_size = 64

    config.optim.name = "adamw"
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 200
    config.optim.decay = "cosine"
    config.optim.min_lr_ratio = 0.05
    config.optim.grad_clip = 1.0
    config.ema.decays = (0.999,)
    config.ema.warmup = True

    config.ckpt.every_steps = 500
    config.ckpt.keep = 2
    config.log.every_steps = 100
    config.log.sample_every_steps = 500
    config.log.num_samples = 100
    config.log.eval_every_steps = config.total_steps
    return config
