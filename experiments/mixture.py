"""A tiny analytic Gaussian-mixture experiment for tests: 8×8×1 "images", a one-level U-Net, seconds per run.

python -m diffax.main --config=experiments/mixture.py --workdir=/tmp/mixture

``--config=experiments/mixture.py:dit`` swaps the U-Net for a one-block DiT of width 16 (4×4 patches),
whose train step compiles in a fraction of the U-Net's time (tests that train on many meshes).
"""

from experiments import common


def get_config(arg=None):
    if arg not in (None, "runlocal", "dit"):  # runlocal: this is laptop-sized already
        raise ValueError(f"experiments/mixture.py:{arg}: the variants are ':dit' and ':runlocal' (or none).")
    config = common.base_config()
    config.total_steps = 8
    config.process.name = "vp_linear"
    if arg == "dit":
        config.model = common.model(
            "dit_s_2",
            depth=1,
            hidden_size=16,
            num_heads=2,
            patch_size=4,
            num_classes=None,
            label_dropout=0.0,
            learned_variance=False,
        )
    else:
        config.model = common.cpu_unet(
            base_channels=8, channel_mult=(1,), attention_resolutions=(), norm_groups=4
        )
    config.loss.prediction = "eps"
    config.sampler.name = "ddim"
    config.sampler.steps = 4
    config.input.dataset = "mixture"
    config.input.image_size = 8
    config.input.channels = 1
    config.input.batch_size = 8
    config.input.mixture_components = 4
    config.input.mixture_std = 0.1
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 2
    config.ema.decays = (0.9, 0.99)
    config.ckpt.every_steps = 4
    config.ckpt.keep = 2
    config.log.every_steps = 2
    config.log.num_samples = 4
    return config
