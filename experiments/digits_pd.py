"""Progressive distillation of the digits default (``experiments/digits.py``) down to one DDIM step.

    python -m diffax.main --config=experiments/digits_pd.py --workdir=runs/digits_pd \
        --config.teacher.workdir=runs/digits
    python -m diffax.generate --workdir=runs/digits_pd --steps=2 --num_samples=100 --out=pd2.png

Salimans & Ho 2022, Alg. 2: the student starts at the teacher's EMA weights and learns in one DDIM step
what the teacher does in two, on a uniform grid of N steps; every ``steps_per_stage`` updates N halves
and the student becomes the teacher (16 -> 8 -> 4 -> 2 -> 1). One checkpoint per stage, so
``diffax.generate --steps=K`` samples the K-step student. The student predicts v (the paper's choice
for few steps, Sec. 4) from the eps teacher's weights; the grid stops at ``t_max`` where sigma / alpha
= 20 instead of the cosine schedule's 2e4 at t = 1, where the eps teacher's data estimate
(x - sigma eps) / alpha is lost to the division (the prior N(0, I) against alpha x_0 + sigma z there:
alpha = 0.05). No EMA (the paper's PD uses none:
an EMA would average across stages). The truncated-SNR x-loss of Sec. 4.
"""

import ml_collections

from experiments import digits


def get_config(arg=None):
    del arg
    config = digits.get_config()
    config.trainer = ml_collections.ConfigDict(
        dict(
            name="progressive",
            initial_steps=16,
            final_steps=1,
            steps_per_stage=200,
            t_max=0.9679,  # cosine: sigma / alpha = tan(pi / 2 (t + 0.008) / 1.008) = 20
            prediction="v",
        )
    )
    config.teacher.workdir = "runs/digits"
    config.total_steps = 5 * config.trainer.steps_per_stage  # stages of 16, 8, 4, 2 and 1 steps
    config.optim.name = "adam"
    config.optim.lr = 1e-4
    config.optim.decay = "constant"
    config.optim.warmup_steps = 0
    config.ema.decays = ()
    config.sampler.name = "ddim"
    config.sampler.steps = 1
    config.ckpt.every_steps = config.trainer.steps_per_stage  # one checkpoint per stage, all kept
    config.ckpt.keep = 5
    config.log.sample_every_steps = config.trainer.steps_per_stage
    config.log.eval_every_steps = 0
    return config
