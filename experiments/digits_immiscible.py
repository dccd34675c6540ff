"""Immiscible diffusion (Li et al. 2024) against plain noise on the embedded digits default, short runs.

    python -m diffax.main --config=experiments/digits_immiscible.py:on --workdir=runs/digits_immiscible
    python -m diffax.main --config=experiments/digits_immiscible.py:off --workdir=runs/digits_plain

Both are ``experiments/digits.py`` shortened to 400 steps (cosine decay over them), tracking the
post-hoc EMAs σ_rel 0.05 and 0.10 with a snapshot every 20 steps (``diffax.posthoc_ema``); ``on``
noises each batch with the linear assignment of ``diffax.immiscible``. Compare them with
``benchmarks/posthoc_ema_digits.py --workdirs=runs/digits_plain,runs/digits_immiscible --step=400``:
at 400 steps plain noise was better (digits-CNN FD 8.81 against 10.87 at each run's best parameters,
judge FD 35.95 against 40.56, 500 samples; benchmarks/results/2026-12-06-posthoc-ema-immiscible-digits.md).
"""

from experiments import digits


def get_config(arg="on"):
    if arg not in ("on", "off"):
        raise ValueError(f"experiments/digits_immiscible.py:{arg}: use :on or :off.")
    config = digits.get_config()
    config.total_steps = 400
    config.loss.immiscible = arg == "on"
    config.ema.std_rels = (0.05, 0.1)
    config.ckpt.every_steps = 20
    config.log.sample_every_steps = 0
    config.log.eval_every_steps = 0
    return config
