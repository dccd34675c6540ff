"""RADD on the text corpus: a time-free network trained with λ-DCE, sampled with the caching sampler.

    python -m diffax.main --config=experiments/text_radd.py --workdir=/tmp/text_radd

Ou et al. 2024: the concrete score is α/(1 − α) times a time-free conditional, so the network takes no t
and the sampler reuses its output while no token changes (the evaluation reports the NFE spent). The
set-up is MDLM's (experiments/text_mdlm.py) with the λ-DCE loss. With MDLM's time-free network and
antithetic times, λ-DCE is MDLM's NELBO sample by sample (``tests/discrete``), so the two runs train alike.
"""

from experiments import text_mdlm


def get_config(arg=None):
    config = text_mdlm.get_config(arg)
    config.loss.name = "radd_lambda_dce"
    return config
