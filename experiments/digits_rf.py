"""Rectified flow of digits (1-RF), reflow on its own ODE pairs (``:reflow``, 2-RF) and one-step
distillation (``:distill``).

    python -m diffax.main --config=experiments/digits_rf.py --workdir=runs/digits_rf
    python -m diffax.fewstep.reflow --workdir=runs/digits_rf --out=runs/digits_rf/pairs \
        --num_chunks=16 --chunk_size=256 --sampler=heun --steps=32
    python -m diffax.main --config=experiments/digits_rf.py:reflow --workdir=runs/digits_reflow \
        --config.teacher.workdir=runs/digits_rf --config.trainer.pairs_dir=runs/digits_rf/pairs
    python -m diffax.fewstep.reflow --workdir=runs/digits_reflow --out=runs/digits_reflow/pairs ...
    python -m diffax.main --config=experiments/digits_rf.py:distill --workdir=runs/digits_distill \
        --config.teacher.workdir=runs/digits_reflow --config.trainer.pairs_dir=runs/digits_reflow/pairs
    python -m diffax.generate --workdir=runs/digits_distill --steps=1 --num_samples=100 --out=rf1.png

Liu et al. 2023: x_t = (1 - t) x + t e (diffax's ``rectified_flow`` schedule, t = 1 noise), the network
regresses v = e - x with t ~ U(0, 0.999] (eq. 1); reflow retrains it on the pairs (Z_0, ODE(Z_0)) of the
previous flow, started from that flow (Alg. 1); distillation (Sec. 2.3, k = 1) regresses e - t_max v(e)
on the pair's image (l2 in place of LPIPS). The pair set is the pair job's (resumable, sharded chunks).
The digits U-Net and optimizer of ``experiments/digits.py``.

Measured (README, benchmarks/results/2026-12-06-fewstep-digits.md; 1000 samples, Euler steps): the 2-RF's
one step and the distilled student's meet all six 1-step targets of issue #30 (CNN FD 0.57x and 0.29x the
floor, classes balanced); at 2 steps both miss only the CNN's confident fraction (82.3%, 86.5% < 87.3%).
Each student's pair job plus training took 1900 and 1661 CPU-s under load. At sampling seeds 1-2 the 1-step
rows still meet all six; the 2-step student memorises its 4096 pairs (89.5% confident on its training
noises, 84.2% on fresh ones): benchmarks/results/2026-12-07-fewstep-rf-seeds-pairs.md.
"""

import ml_collections

from experiments import digits


def flow_run(config: ml_collections.ConfigDict, trainer: dict, *, process: str = "rectified_flow"):
    """What the digits flow runs share: their schedule and trainer, plain x_0 predictions (no clipping:
    the trainers' ODEs and pairs are the unclipped flows), the digits metrics by ``diffax.evaluate``."""
    config.process = ml_collections.ConfigDict(dict(name=process))
    config.loss.name = "flow_matching"  # the velocity-predicting network of a flow run
    config.loss.prediction = "flow"
    config.loss.weighting = "uniform"
    config.trainer = ml_collections.ConfigDict(trainer)
    config.sampler.clip_denoised = False
    config.sampler.spacing = "uniform_t"
    config.log.eval_every_steps = 0  # python -m diffax.evaluate --steps=K measures each K
    return config


def get_config(arg=None):
    if arg not in (None, "reflow", "distill"):
        raise ValueError(f"experiments/digits_rf.py:{arg}: the variants are ':reflow', ':distill' or none.")
    config = flow_run(digits.get_config(), dict(name="rectified_flow"))
    config.sampler.name = "heun"
    config.sampler.steps = 16
    if arg is None:
        return config
    # --config.trainer.pairs_dir=DIR of the pair job; --config.teacher.workdir=DIR: the flow that made them
    config.trainer.pairs_dir = "runs/digits_rf/pairs" if arg == "reflow" else "runs/digits_reflow/pairs"
    config.total_steps = 1000
    config.optim.warmup_steps = 0
    config.optim.lr = 5e-4
    if arg == "distill":
        config.trainer.distill_steps = 1
        config.sampler.name = "ddim"
        config.sampler.steps = 1
    else:
        config.sampler.steps = 4
    return config
