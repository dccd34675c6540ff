"""A tiny analytic Gaussian-mixture experiment for tests: 8×8×1 "images", a one-level U-Net, seconds per run.

python -m diffax.main --config=experiments/mixture.py --workdir=/tmp/mixture

``--config=experiments/mixture.py:dit`` swaps the U-Net for a one-block DiT of width 16 (4×4 patches),
whose train step compiles in a fraction of the U-Net's time (tests that train on many meshes).
``:vae`` trains a tiny autoencoder instead (kl-f2 layout: 8 and 16 channels, 2 latent channels) with
the LDM ``contperceptual`` loss (the tests' VAE, also as a random diffusers folder for latent runs).
"""

import ml_collections

from experiments import common


def get_config(arg=None):
    if arg not in (None, "runlocal", "dit", "vae"):  # runlocal: this is laptop-sized already
        raise ValueError(
            f"experiments/mixture.py:{arg}: the variants are ':dit', ':vae' and ':runlocal' (or none)."
        )
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
    if arg == "vae":
        config.model = common.model("autoencoder_kl_f4", base_channels=8, channel_mult=(1, 2))
        config.model.update(image_channels=1, latent_channels=2, num_res_blocks=1, norm_groups=4)
        config.model.mid_attention = False
        # The plain XLA formulations: they compile fastest, and these runs are all compile.
        config.model.update(dict.fromkeys(("norm_impl", "conv_impl", "attention_impl"), "xla"))
        config.loss = ml_collections.ConfigDict(
            dict(name="contperceptual", disc_start=2, disc_layers=1, disc_channels=4, kl_weight=0.1)
        )
        config.optim.name, config.optim.b1, config.optim.b2 = "adam", 0.5, 0.9
        config.optim.grad_clip, config.optim.warmup_steps = 0.0, 0
        config.ema.decays = ()
    return config
