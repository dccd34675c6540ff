"""A stochastic interpolant of digits: trigonometric with a latent term gamma(t) z, velocity loss, sampled
by its SDE with a tunable diffusion.

    python -m diffax.main --config=experiments/digits_interpolant.py --workdir=runs/digits_si
    python -m diffax.generate --workdir=runs/digits_si --num_samples=100 --out=si.png \
        [--sampler=heun --steps=16]   # the ODE instead

Albergo et al. 2023: x_t = sin(pi t / 2) x_1 + cos(pi t / 2) x_0 + sqrt(g t (1 - t)) z (``process.name
= "interpolant"``), the velocity loss (eq. 2.13) or ``--config.trainer.loss=denoiser`` (eq. 2.15), and
dX = (b + eps s) dt + sqrt(2 eps) dW (eq. 2.32) with ``--config.sampler.diffusion=eps``.
"""

import ml_collections

from experiments import digits, digits_rf


def get_config(arg=None):
    del arg
    config = digits_rf.flow_run(digits.get_config(), dict(name="interpolant", loss="velocity"))
    config.process = ml_collections.ConfigDict(dict(name="interpolant", kind="trig", gamma_scale=0.1))
    config.loss.name = "simple"  # the schedule's diffusion loss is not used; the trainer's is
    config.loss.prediction = "eps"
    config.sampler.name = "interpolant_sde"
    config.sampler.diffusion = 0.5
    config.sampler.steps = 50
    return config
