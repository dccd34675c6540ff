"""DiT-S/2 (Peebles & Xie 2023) trained class-conditionally on 32×32 ImageNet pixels.

    python -m diffax.main --config=experiments/dit.py --workdir=runs/dit
    python -m diffax.main --config=experiments/dit.py:runlocal --workdir=/tmp/dit  # smoke run

The paper's recipe (Sec. 4): linear β schedule with T = 1000, learned Σ (hybrid loss), AdamW at
1e-4 with no weight decay, batch 256, EMA 0.9999, 10% label dropout, guidance scale 1.5. The paper
trains on Stable-Diffusion VAE latents of 256×256 images (32×32×4); diffax has no VAE, so this runs
the same network on the tfds ``imagenet_resized/32x32`` pixels (32×32×3), prepared beforehand.
"""

from experiments import common


def get_config(arg=None):
    config = common.base_config()
    config.total_steps = 400_000
    config.process.name = "linear"
    config.process.num_timesteps = 1000
    # bfloat16 compute; parameters, optimizer state, loss and sampler state stay float32.
    config.model = common.model("dit_s_2", dtype="bfloat16")
    config.loss.name = "hybrid"
    config.loss.prediction = "eps"
    config.loss.learned_variance = True
    config.sampler.name = "ddpm"
    config.sampler.steps = 250
    config.sampler.variance = "learned"
    config.sampler.guidance_scale = 1.5
    common.tfds_images(config, "imagenet_resized/32x32", image_size=32, labels=True)
    config.input.num_classes = 1000
    config.input.batch_size = 256
    config.optim.name = "adamw"
    config.optim.lr = 1e-4
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 0.0
    config.ema.decays = (0.9999,)
    config.ckpt.every_steps = 5000
    config.log.every_steps = 200
    config.log.sample_every_steps = 10_000
    if arg == "runlocal":
        common.runlocal(config)
        config.model.depth = 2
        config.model.hidden_size = 64
        config.model.num_heads = 2
    return config
