"""DDPM on CIFAR-10 with the paper's settings (Ho et al. 2020, Sec. 4 and App. B).

    python -m diffax.main --config=experiments/cifar10.py --workdir=runs/cifar10
    python -m diffax.main --config=experiments/cifar10.py:runlocal --workdir=/tmp/cifar10  # laptop smoke run

35.7M-parameter U-Net, linear β schedule with T = 1000, ε-prediction with L_simple, Adam at 2e-4
with 5000 warmup steps and gradient clipping at 1, batch 128, EMA 0.9999, dropout 0.1, random
horizontal flips, 800k steps. The tfds ``cifar10`` set must be prepared under ``config.input.data_dir``
(``tfds.builder("cifar10", data_dir=...).download_and_prepare()``); nothing downloads at run time.
"""

from experiments import common


def get_config(arg=None):
    config = common.base_config()
    config.total_steps = 800_000
    config.process.name = "linear"
    config.process.num_timesteps = 1000
    config.model = common.model("unet_ddpm_cifar10")
    config.loss.name = "simple"
    config.loss.prediction = "eps"
    config.sampler.name = "ddim"
    config.sampler.steps = 100
    common.tfds_images(config, "cifar10", image_size=32)
    config.input.batch_size = 128
    config.optim.name = "adam"
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0
    config.ema.decays = (0.9999,)
    config.ckpt.every_steps = 10_000
    config.log.every_steps = 500
    config.log.sample_every_steps = 10_000
    if arg == "runlocal":
        common.runlocal(config)
        config.model = common.cpu_unet(attention_resolutions=(8,))
    return config
