"""D3PM on the text corpus: ``:uniform`` or ``:absorbing`` (default), T = 1000, hybrid loss λ = 0.01.

    python -m diffax.main --config=experiments/text_d3pm.py:absorbing --workdir=/tmp/text_d3pm_absorbing
    python -m diffax.main --config=experiments/text_d3pm.py:uniform --workdir=/tmp/text_d3pm_uniform

x_0-parameterisation with a time-conditioned transformer; the reported bound is the full VLB
(Austin et al. 2021, Sec. 3.4, 5). Append ``,runlocal`` for a smoke run (``:absorbing,runlocal``).
"""

import ml_collections

from experiments.text_mdlm import text_config


def get_config(arg=None):
    kind, *rest = (arg or "absorbing").split(",")
    config = text_config(rest[0] if rest else None)
    config.process = ml_collections.ConfigDict(dict(name=f"d3pm_{kind}", num_steps=1000))
    config.model.time_conditioning = True
    config.model.out_dim = config.model.vocab_size + (kind == "absorbing")
    config.loss = ml_collections.ConfigDict(dict(name="d3pm_hybrid", hybrid_coeff=0.01))
    config.sampler.name = "d3pm_ancestral"
    return config
