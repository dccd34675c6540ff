"""The embedded latent demo: a small DiT on the 8×8×4 latents of the digits VAE, decoded to 32×32.

    python -m diffax.main --config=experiments/digits_vae.py --workdir=runs/digits_vae      # 1. VAE
    python -m diffax.latent --config=experiments/digits_latent.py                            # 2. cache
    python -m diffax.main --config=experiments/digits_latent.py --workdir=runs/digits_latent # 3. model
    python -m diffax.generate --workdir=runs/digits_latent --num_samples=64 --out=grid.png   # 4. decode

Step 2 encodes the digits train split once (posterior mean and log-variance, ``runs/digits_latent_cache``)
and stores the latent scale 1/std; step 3 draws a fresh posterior sample per step, trains DiT-S-sized
blocks (4 deep, width 192, patch 2: 16 tokens) with the pixel default's recipe (``experiments/digits.py``), and decodes
its samples through the frozen VAE for the grids and the digits metrics of both judges. Point
``--config.vae.workdir`` and ``--config.input.data_dir`` elsewhere to use another VAE run and cache
(or ``--config.vae.pretrained=FOLDER`` for a diffusers AutoencoderKL).
"""

from experiments import common, digits


def get_config(arg=None):
    config = digits.get_config(arg)  # the pixel default's diffusion, optimizer and logging recipe
    config.model = common.model(
        "dit_s_2",
        depth=4,
        hidden_size=192,
        num_heads=3,
        num_classes=None,
        label_dropout=0.0,
        learned_variance=False,
    )
    # The pixel default's SDE-DPM-Solver++(2M), 25 steps, without its clipping of x0 to [-1, 1]:
    # latents are not bounded like pixels. Judged on 1000 samples like the pixel default.
    config.sampler.clip_denoised = False
    config.optim.lr = 1e-3
    config.vae.workdir = "runs/digits_vae"
    config.vae.source.dataset = "digits"
    config.vae.source.split = "train"
    config.vae.source.upsample = 4
    config.input.dataset = "latents"
    config.input.data_dir = "runs/digits_latent_cache"
    config.input.image_size = 8
    config.input.channels = 4
    return config
