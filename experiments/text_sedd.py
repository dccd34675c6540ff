"""SEDD (absorbing) on the text corpus: score entropy with SEDD's time-conditioned score network.

    python -m diffax.main --config=experiments/text_sedd.py --workdir=/tmp/text_sedd

The network's output minus log(e^σ − 1) is the log concrete score; the bound is the DWDSE (Lou et al.
2024, eq. 16); sampling is Euler τ-leaping (``--config.sampler.name=masked_ancestral`` for Tweedie).
"""

import ml_collections

from experiments.text_mdlm import text_config


def get_config(arg=None):
    config = text_config(arg)
    config.process = ml_collections.ConfigDict(dict(name="masked", eps=0.0))
    config.model.time_conditioning = True
    config.loss = ml_collections.ConfigDict(dict(name="sedd"))
    config.sampler.name = "tau_leaping"
    return config
