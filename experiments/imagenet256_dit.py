"""DiT-XL/2 exactly as Peebles & Xie (2023) train it: ImageNet 256×256 in the SD VAE's latent space.

    python -m diffax.latent --config=experiments/imagenet256_dit.py        # encode ImageNet once
    python -m diffax.main --config=experiments/imagenet256_dit.py --workdir=runs/imagenet256_dit
    python -m diffax.main --config=experiments/imagenet256_dit.py:runlocal --workdir=/tmp/dit256

Paper recipe (Sec. 4; the diffusion settings are ``experiments/dit.py``'s): latents 32×32×4 from the
Stable Diffusion VAE (``--config.vae.pretrained``: a local ``stabilityai/sd-vae-ft-ema`` diffusers
folder; nothing downloads), linear β schedule with T = 1000, learned Σ (hybrid loss), AdamW at 1e-4
with no weight decay, batch 256, EMA 0.9999, 10% class dropout, 400K steps; samples by 250-step DDPM
with guidance 1.5. Images come from a tfds ImageNet directory (``--config.vae.source.data_dir``, the
prepared ``imagenet2012``), center-cropped to 256×256 by the cache job as the paper does (ADM's
``center_crop_arr``: box halving, bicubic resize of the short side, centre square), read one shard of
the split at a time. The paper flips images at random: the cache also encodes every image's mirror
(``input.random_flip``), and training takes the mirror's posterior half the time. The latent pipeline
reads the cache memory-mapped (mean and log-variance, 2 × 21 GB in float32 for the 1.28M images, twice
that with the mirrors, stay on disk). The paper scales latents by SD's 0.18215; diffax computes 1/std
of the cached latents unless ``--config.vae.scale=0.18215`` is given.
"""

from experiments import common, dit


def get_config(arg=None):
    config = dit.get_config(arg)
    # bfloat16 compute; parameters, optimizer state, loss and sampler state stay float32.
    config.model = common.model("dit_xl_2", dtype="bfloat16")
    config.vae.pretrained = "sd-vae-ft-ema"
    config.vae.source.dataset = "imagenet2012"
    config.vae.source.split = "train"
    config.vae.source.image_size = 256
    config.input.dataset = "latents"
    config.input.data_dir = "runs/imagenet256_latents"
    config.input.image_size = 32
    config.input.channels = 4
    config.input.random_flip = True  # the cache holds each image's and its mirror's posterior
    if arg == "runlocal":
        config.model.depth = 2
        config.model.hidden_size = 64
        config.model.num_heads = 2
    return config
