"""MeanFlow of digits from scratch (one-step generation by the average velocity, exact ``jax.jvp``), and
``:shortcut``, a shortcut model on the same network of an interval.

    python -m diffax.main --config=experiments/digits_meanflow.py --workdir=runs/digits_meanflow
    python -m diffax.generate --workdir=runs/digits_meanflow --steps=1 --num_samples=100 --out=mf1.png
    python -m diffax.main --config=experiments/digits_meanflow.py:shortcut --workdir=runs/digits_shortcut

Geng et al. 2025: u(z, r, t) on x_t = (1 - t) x + t e, regressed on stopgrad(v - (t - r) du/dt), (r, t)
logit-normal (-0.4, 1.0) with r = t for 75% of the batch, adaptive weight p = 1; the U-Net sees (t, t - r)
(``model.interval_embedding``) in the positional embedding of t itself (``time_scale=1``): du/dt runs
through the time features, and at DDPM's scale of 1000 their derivative swamps the target. Frans et al.
2024 (``:shortcut``): flow matching at d = 0 for 7/8 of the batch, self-consistency s(x, t, 2d) =
(s(x, t, d) + s(x - d s, t - d, d)) / 2 from the EMA target network for 1/8, d down to 1/128. Both sample
K steps z_s = z_t - (t - s) u on a uniform grid (DDIM on the data prediction, exactly).

Measured (README few-step table, 1000 samples, both judges): MeanFlow at 1600 steps, 1749 CPU-s, CNN FD
1.13x / 0.79x / 0.37x the floor at 1 / 2 / 4 steps (89.6% confident at 4); the shortcut model at 2000
steps, 1483 CPU-s, 3.27x / 2.61x / 2.00x.
"""

from experiments import digits, digits_rf


def get_config(arg=None):
    if arg not in (None, "shortcut"):
        raise ValueError(f"experiments/digits_meanflow.py:{arg}: the variants are ':shortcut' or none.")
    trainer = dict(name="meanflow") if arg is None else dict(name="shortcut", target_decay=0.99)
    config = digits_rf.flow_run(digits.get_config(), trainer)
    config.model.interval_embedding = True
    if arg is None:  # its tangent differentiates the network in t: the positional embedding of t itself
        config.model.time_scale = 1.0
        config.total_steps = 1600  # about 1 CPU-s a step: 1749 CPU-s under load (idle wall time unmeasured)
    config.sampler.name = "ddim"
    config.sampler.steps = 1
    return config
