"""The autoregressive baseline of the text runs: the same transformer, causal, same data, steps and optimizer.

    python -m diffax.main --config=experiments/text_ar.py --workdir=/tmp/text_ar
    python -m diffax.evaluate --workdir=/tmp/text_ar   # exact held-out bits_per_char

Inputs are shifted right behind a BOS token; the loss is the exact negative log-likelihood.

Measured (benchmarks/results/2026-12-07-text-8500.md), 4 blocks × 96, the shared recipe (8500 steps, lr
3e-3, weight decay 0.1): the held-out NLL was lowest at step 2000 (1.7351 bits/char) and rose after it (the
causal model over-fits the 348k training characters; without weight decay: best 1.7432 at step 1500, 2.84
at step 8500); MDLM of the same size reaches 2.2365 at 8500 steps, 1.289× that best checkpoint. At 2
blocks × 128 (4000 steps): best 1.766 (step 1500).
"""

import ml_collections

from experiments.text_mdlm import text_config


def get_config(arg=None):
    config = text_config(arg)
    config.process = ml_collections.ConfigDict(dict(name="autoregressive"))
    config.model.causal = True
    config.loss = ml_collections.ConfigDict(dict(name="autoregressive"))
    config.sampler.name = "autoregressive"
    return config
