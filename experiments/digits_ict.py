"""Improved consistency training (iCT) of digits from scratch: no teacher, one- and two-step samples.

    python -m diffax.main --config=experiments/digits_ict.py --workdir=runs/digits_ict
    python -m diffax.generate --workdir=runs/digits_ict --steps=2 --num_samples=100 --out=ict2.png

Song & Dhariwal 2024: theta^- = stopgrad(theta) (mu = 0), pseudo-Huber distance with c = 0.00054 sqrt(d),
weight 1 / (sigma_{n+1} - sigma_n), lognormal levels (P_mean -1.1, P_std 2.0) and the doubling
curriculum 10 -> 1280 (here compressed into the run's steps), on the EDM process (sigma in
[0.002, 80], sigma_data 0.5) with EDM preconditioning of the digits U-Net.
"""

import ml_collections

from experiments import digits, digits_cd


def get_config(arg=None):
    del arg
    config = digits.get_config()
    config.process = ml_collections.ConfigDict(
        dict(name="edm", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    )
    config.loss.name = "edm"
    config.loss.prediction = "x0"
    config.loss.weighting = "uniform"
    config.trainer = ml_collections.ConfigDict(
        dict(
            name="consistency",
            target="data",
            sigma_min=0.002,
            sigma_max=80.0,
            sigma_data=0.5,
            curriculum="ict",
            s0=10,
            s1=1280,
            index="lognormal",
            p_mean=-1.1,
            p_std=2.0,
            distance="pseudo_huber",
            weighting="inverse_dsigma",
        )
    )
    config.total_steps = 2000
    config.optim.warmup_steps = 100
    return digits_cd.consistency_run(
        config, lr=1e-3, decay="cosine", ema=0.999, sample_steps=2, save_every=500
    )
