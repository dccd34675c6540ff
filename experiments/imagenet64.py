"""Class-conditional ImageNet 64×64 with the improved-DDPM / ADM recipe.

    python -m diffax.main --config=experiments/imagenet64.py --workdir=runs/imagenet64
    python -m diffax.main --config=experiments/imagenet64.py:runlocal --workdir=/tmp/in64  # smoke run

Cosine schedule (Nichol & Dhariwal 2021, eq. 17) with T = 1000, a learned variance trained with the
hybrid loss L_simple + 0.001 L_vlb (ibid., eq. 16), the ADM U-Net (Dhariwal & Nichol 2021: 192 base
channels, multipliers 1, 2, 3, 4, three blocks per level, attention at 32, 16 and 8 with 64 channels
per head, scale-shift norm, BigGAN resampling, dropout 0.1), batch 2048, AdamW at 3e-4, EMA 0.9999,
and 10% label dropout so classifier-free guidance can be used at sampling time. Uses the tfds
``imagenet_resized/64x64`` set, prepared under ``config.input.data_dir`` beforehand.
"""

from experiments import common


def get_config(arg=None):
    config = common.base_config()
    config.total_steps = 540_000
    config.process.name = "cosine"
    config.process.num_timesteps = 1000
    # bfloat16 compute; parameters, optimizer state, loss and sampler state stay float32.
    config.model = common.model("unet_adm_imagenet64", dtype="bfloat16")
    config.model.label_dropout = 0.1
    config.loss.name = "hybrid"
    config.loss.prediction = "eps"
    config.loss.learned_variance = True
    config.loss.vlb_weight = 1e-3
    config.sampler.name = "ddpm"
    config.sampler.steps = 250
    config.sampler.variance = "learned"
    config.sampler.guidance_scale = 1.5
    common.tfds_images(config, "imagenet_resized/64x64", image_size=64, labels=True)
    config.input.num_classes = 1000
    config.input.random_flip = True
    config.input.batch_size = 2048
    config.optim.name = "adamw"
    config.optim.lr = 3e-4
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 1.0
    config.ema.decays = (0.9999,)
    config.mesh.fsdp = 8
    config.ckpt.every_steps = 5000
    config.log.every_steps = 200
    config.log.sample_every_steps = 10_000
    if arg == "runlocal":
        common.runlocal(config)
        config.mesh.fsdp = 1
        config.input.image_size = 16
        # The ADM preset's class conditioning, learned variance, scale-shift norm and resampling blocks
        # stay; widths, depth and attention shrink.
        config.model = common.cpu_unet(
            "unet_adm_imagenet64", attention_resolutions=(8,), head_channels=None, label_dropout=0.1
        )
    return config
