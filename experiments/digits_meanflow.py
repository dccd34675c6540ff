"""MeanFlow of digits from scratch: one-step generation by the average velocity (exact ``jax.jvp``).

    python -m diffax.main --config=experiments/digits_meanflow.py --workdir=runs/digits_meanflow
    python -m diffax.generate --workdir=runs/digits_meanflow --steps=1 --num_samples=100 --out=mf1.png

Geng et al. 2025: u(z, r, t) on x_t = (1 - t) x + t e, regressed on stopgrad(v - (t - r) du/dt), (r, t)
logit-normal (-0.4, 1.0) with r = t for 75% of the batch, adaptive weight p = 1; the U-Net sees (t, t - r)
(``model.interval_embedding``). K-step sampling z_r = z_t - (t - r) u on a uniform grid.
"""

from experiments import digits, digits_rf


def interval_run(config, trainer: dict):
    """What the digits interval networks (MeanFlow, shortcut) share: the U-Net of (t, t - r), DDIM on the
    uniform grid (exactly z_s = z_t - (t - s) u), one step by default."""
    config = digits_rf.flow_run(config, trainer)
    config.model.interval_embedding = True
    config.sampler.name = "ddim"
    config.sampler.steps = 1
    return config


def get_config(arg=None):
    del arg
    return interval_run(digits.get_config(), dict(name="meanflow"))
