"""The autoregressive baseline of the text runs: the same transformer, causal, same data, steps and optimizer.

    python -m diffax.main --config=experiments/text_ar.py --workdir=/tmp/text_ar
    python -m diffax.evaluate --workdir=/tmp/text_ar   # exact held-out bits_per_char

Inputs are shifted right behind a BOS token; the loss is the exact negative log-likelihood.
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
