"""Immiscible diffusion (Li et al. 2024) against plain noise on the embedded digits default, at equal steps.

    python -m diffax.main --config=experiments/digits_immiscible.py:off --workdir=runs/digits_plain
    python -m diffax.main --config=experiments/digits_immiscible.py:on --workdir=runs/digits_immiscible

Both are ``experiments/digits.py`` (same seed, data order and recipe) shortened to 1000 steps (cosine
decay over them), tracking the post-hoc EMAs σ_rel 0.05 and 0.10 with a snapshot every 50 steps
(``diffax.posthoc_ema``), and evaluated at the end on 1000 samples under both digits judges; ``on``
noises each batch with the linear assignment of ``diffax.immiscible``. Measured results:
benchmarks/results/2026-12-06-posthoc-ema-immiscible-digits.md.
"""

from experiments import digits


def get_config(arg="on"):
    if arg not in ("on", "off"):
        raise ValueError(f"experiments/digits_immiscible.py:{arg}: use :on or :off.")
    config = digits.get_config()
    config.total_steps = 1000
    config.loss.immiscible = arg == "on"
    config.ema.std_rels = (0.05, 0.1)
    config.ckpt.every_steps = 50
    config.log.eval_every_steps = config.total_steps  # both judges on evals.num_samples (1000) at the end
    return config
