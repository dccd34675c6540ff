"""Categorical diffusion over token sequences (D3PM, MDLM, SEDD, RADD) and an autoregressive baseline.

Processes and losses are pure functions, samplers are pure steps under one ``lax.scan``, the network is
a Flax transformer over tokens, and :mod:`diffax.discrete.system` plugs them into the one training
loop (``python -m diffax.main``), ``diffax.generate`` and ``diffax.evaluate``.
"""

from diffax.discrete.losses import (
    LOSSES,
    autoregressive_terms,
    d3pm_terms,
    lambda_dce_terms,
    make_loss,
    mdlm_terms,
    score_entropy_terms,
    sedd_log_score,
    subs_log_probs,
)
from diffax.discrete.model import TokenTransformer
from diffax.discrete.processes import (
    D3PM,
    MaskedProcess,
    antithetic_times,
    d3pm,
    d3pm_marginal,
    d3pm_posterior_logits,
    d3pm_sample,
    masked_sample,
    masked_sample_count,
    stratified_counts,
    transition,
)
from diffax.discrete.samplers import (
    SAMPLERS,
    categorical_f64,
    sample,
    sample_autoregressive,
    sample_entropy,
)

__all__ = [
    "D3PM",
    "LOSSES",
    "SAMPLERS",
    "MaskedProcess",
    "TokenTransformer",
    "antithetic_times",
    "autoregressive_terms",
    "categorical_f64",
    "d3pm",
    "d3pm_marginal",
    "d3pm_posterior_logits",
    "d3pm_sample",
    "d3pm_terms",
    "lambda_dce_terms",
    "make_loss",
    "masked_sample",
    "masked_sample_count",
    "mdlm_terms",
    "sample",
    "sample_autoregressive",
    "sample_entropy",
    "score_entropy_terms",
    "sedd_log_score",
    "stratified_counts",
    "subs_log_probs",
    "transition",
]
