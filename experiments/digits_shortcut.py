"""A shortcut model of digits: one network of the step size d, one to four steps.

    python -m diffax.main --config=experiments/digits_shortcut.py --workdir=runs/digits_shortcut
    python -m diffax.generate --workdir=runs/digits_shortcut --steps=1 --num_samples=100 --out=sc1.png

Frans et al. 2024: flow matching at d = 0 for 7/8 of the batch, self-consistency s(x, t, 2d) =
(s(x, t, d) + s(x - d s, t - d, d)) / 2 from the EMA target network for 1/8, d down to 1/128.
"""

from experiments import digits, digits_meanflow


def get_config(arg=None):
    del arg
    config = digits_meanflow.interval_run(digits.get_config(), dict(name="shortcut", target_decay=0.99))
    return config
