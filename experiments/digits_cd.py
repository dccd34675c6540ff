"""Consistency distillation of the digits default (``experiments/digits.py``): one- and two-step digits.

    python -m diffax.main --config=experiments/digits_cd.py --workdir=runs/digits_cd \
        --config.teacher.workdir=runs/digits
    python -m diffax.generate --workdir=runs/digits_cd --steps=1 --num_samples=100 --out=cd1.png

The student starts from the teacher's EMA weights and learns its consistency function on an 18-level
Karras grid with one Heun step of the teacher as target (Song et al. 2023, CD with mu = 0, l2, uniform
weight). The levels start at sigma/alpha = 0.0065, the teacher's smallest trained one (t = 1/1000 of
the cosine schedule). Sampling uses the multistep consistency sampler (``sampler="consistency"``).
"""

import ml_collections

from experiments import digits


def get_config(arg=None):
    del arg
    config = digits.get_config()
    config.trainer = ml_collections.ConfigDict(
        dict(
            name="consistency",
            target="teacher",
            teacher_sampler="heun",
            sigma_min=0.0065,
            sigma_max=80.0,
            sigma_data=0.5,
            curriculum="fixed",
            num_scales=18,
            mu=0.0,
            distance="l2",
            weighting="uniform",
        )
    )
    config.teacher.workdir = "runs/digits"
    config.total_steps = 1200
    config.optim.name = "adam"
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 0
    config.optim.decay = "constant"
    config.ema.decays = (0.99,)
    config.sampler.name = "consistency"
    config.sampler.steps = 1
    config.sampler.thresholding = None
    config.ckpt.every_steps = 300
    config.log.sample_every_steps = 300
    config.log.eval_every_steps = 0
    return config
