"""The autoregressive baseline of the text runs: the same transformer, causal, same data, steps and optimizer.

    python -m diffax.main --config=experiments/text_ar.py --workdir=/tmp/text_ar
    python -m diffax.evaluate --workdir=/tmp/text_ar   # exact held-out bits_per_char

Inputs are shifted right behind a BOS token; the loss is the exact negative log-likelihood.

Measured (benchmarks/results/2026-12-06-text-bpc-4000.md), 4 blocks × 96: the held-out NLL was lowest at
step 1500 (1.7585 bits/char) and rose after it (the causal model over-fits the 348k training characters);
MDLM of the same size reaches 2.433 at 4000 steps, 1.38× that. At 2 blocks × 128: best 1.766 (step 1500).
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
