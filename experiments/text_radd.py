"""RADD on the text corpus: a time-free network trained with λ-DCE, sampled with the caching sampler.

    python -m diffax.main --config=experiments/text_radd.py --workdir=/tmp/text_radd

Ou et al. 2024: the concrete score is α/(1 − α) times a time-free conditional, so the network takes no t
and the sampler reuses its output while no token changes (the evaluation reports the NFE spent).
"""

import ml_collections

from experiments.text_mdlm import text_config


def get_config(arg=None):
    config = text_config(arg)
    config.process = ml_collections.ConfigDict(dict(name="masked", eps=0.0))
    config.loss = ml_collections.ConfigDict(dict(name="radd_lambda_dce"))
    config.sampler.name = "masked_ancestral"
    config.sampler.cache = True
    return config
