"""Discrete losses against exact answers: SEDD/RADD/MDLM identity, uniform predictors, a Markov source."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import discrete
from diffax.data import markov

V, L = 3, 5


def _all_masks(length):
    return np.array(list(itertools.product([0, 1], repeat=length)), bool)


def _exact_conditionals(source, length):
    """All sequences, their probabilities, and p(x_i | unmasked part) for every (sequence, mask) pair."""
    seqs = np.array(list(itertools.product(range(source.vocab_size), repeat=length)))
    p = np.exp(source.log_prob(seqs))
    masks = _all_masks(length)
    # consistent[m, a, b]: sequences a and b agree on the unmasked positions of mask m
    agree = (seqs[None, :, None, :] == seqs[None, None, :, :]) | masks[:, None, None, :]
    consistent = agree.all(-1)
    # cond[m, a, i, y] = p(x_i = y | x_U = a_U)
    onehot = np.eye(source.vocab_size)[seqs]  # (S, L, V)
    num = np.einsum("mab,biy->maiy", consistent * p[None, None, :], onehot)
    cond = num / num.sum(-1, keepdims=True)
    return seqs, p, masks, cond


def _expectation_over_t(terms_at, length):
    """∫_0^1 E_{z_t}[terms] dt exactly: the integrand is a polynomial of degree < length in t."""
    nodes, weights = np.polynomial.legendre.leggauss(length + 1)
    ts, ws = (nodes + 1) / 2, weights / 2
    return sum(w * terms_at(t) for t, w in zip(ts, ws, strict=True))


@pytest.fixture(scope="module")
def source_tables():
    source = markov.markov_source(vocab_size=V, order=2, seed=3)
    return source, _exact_conditionals(source, L)


def test_markov_nelbo_of_exact_model_is_entropy_rate_plus_gap(source_tables):
    """MDLM's NELBO with the exact conditionals is H(X_1..X_L) = L h + (H(X_1..X_k) − k h)."""
    source, (seqs, p, masks, cond) = source_tables
    proc = discrete.MaskedProcess(vocab_size=V)
    n_seq, n_mask = len(seqs), len(masks)
    x0 = np.repeat(seqs, n_mask, 0)
    z = np.where(np.tile(masks, (n_seq, 1)), V, x0)
    log_probs = jnp.log(
        jnp.asarray(np.transpose(cond, (1, 0, 2, 3)).reshape(n_seq * n_mask, L, V), jnp.float32)
    )
    count = np.tile(masks.sum(1), n_seq)

    def terms_at(t):
        per = np.asarray(discrete.mdlm_terms(proc, log_probs, x0, z, jnp.full((len(z),), t)), np.float64)
        prob = t**count * (1 - t) ** (L - count)
        return (per * prob).reshape(n_seq, n_mask).sum(1)

    nelbo = float(np.sum(p * _expectation_over_t(terms_at, L)))
    h = source.entropy_rate()
    gap = source.block_entropy(source.order) - source.order * h
    np.testing.assert_allclose(nelbo / L, h + gap / L, rtol=2e-5)
    np.testing.assert_allclose(nelbo, -np.sum(p * np.log(p)), rtol=2e-5)


def test_uniform_predictor_scores_log_v():
    vocab, length, b = 27, 6, 64
    proc = discrete.MaskedProcess(vocab_size=vocab)
    masks = _all_masks(length)
    x0 = jax.random.randint(jax.random.key(0), (len(masks), length), 0, vocab)
    z = jnp.where(jnp.asarray(masks), vocab, x0)
    uniform = jnp.zeros((len(masks), length, vocab))
    count = masks.sum(1)

    def expected(loss_terms):
        return _expectation_over_t(
            lambda t: float(np.sum(np.asarray(loss_terms(t)) * t**count * (1 - t) ** (length - count))),
            length,
        )

    mdlm = expected(
        lambda t: discrete.mdlm_terms(proc, discrete.subs_log_probs(uniform), x0, z, jnp.full((len(z),), t))
    )
    np.testing.assert_allclose(mdlm / length, np.log(vocab), rtol=1e-5)
    # the AR bound and the estimator of make_loss on a uniform network
    np.testing.assert_allclose(
        discrete.autoregressive_terms(uniform[:2], x0[:2]) / length, np.log(vocab), rtol=1e-6
    )
    apply_fn = lambda params, tokens, t, key: jnp.zeros((*tokens.shape, vocab))
    loss_fn = jax.jit(discrete.make_loss(proc, apply_fn, loss="mdlm"))
    x = jax.random.randint(jax.random.key(1), (b, 64), 0, vocab)
    estimates = [float(loss_fn(None, {"tokens": x}, jax.random.key(i))[0]) for i in range(8)]
    np.testing.assert_allclose(np.mean(estimates), np.log(vocab), rtol=0.02)
    by_count = jax.jit(discrete.make_loss(proc, apply_fn, loss="mdlm", mask_sampling="count"))
    _, aux = by_count(None, {"tokens": x}, jax.random.key(0))  # (L/k)·k·log V: no variance at all
    np.testing.assert_allclose(aux["bound"] / 64, np.log(vocab), rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_sedd_with_radd_parameterisation_equals_mdlm_per_sample(eps):
    proc = discrete.MaskedProcess(vocab_size=V, eps=eps)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(5), 4)
    b, length = 16, 12
    x0 = jax.random.randint(k1, (b, length), 0, V)
    t = jax.random.uniform(k2, (b,), minval=0.01, maxval=1.0)
    z = discrete.masked_sample(proc, x0, t, k3)
    logits = 3.0 * jax.random.normal(k4, (b, length, V))

    @jax.jit
    def both(logits, z, t):
        mdlm = discrete.mdlm_terms(proc, discrete.subs_log_probs(logits), x0, z, t)
        log_score = discrete.sedd_log_score(proc, logits, t, parameterization="radd")
        return mdlm, discrete.score_entropy_terms(proc, log_score, x0, z, t)

    mdlm, sedd = both(logits, z, t)
    np.testing.assert_allclose(sedd, mdlm, rtol=2e-4, atol=1e-4)
    assert float(jnp.min(mdlm)) >= 0 and float(jnp.max(mdlm)) > 0
    if eps == 0.0:  # λ = 1 − α_t = t: the λ-DCE sample is the same number
        dce = discrete.lambda_dce_terms(discrete.subs_log_probs(logits), x0, z, t, mask_index=V)
        np.testing.assert_allclose(dce, mdlm, rtol=1e-5)


def test_lambda_dce_equals_mdlm_in_expectation(source_tables):
    """E_λ E_{z_λ}[λ-DCE] of an arbitrary time-free network = the any-order sum Σ_m f(m)/m = MDLM's NELBO."""
    _, (seqs, _, masks, _) = source_tables
    net = jax.nn.log_softmax(jax.random.normal(jax.random.key(2), (len(masks), L, V)))  # any c_θ(·|z)
    x0 = jnp.asarray(seqs[7])[None].repeat(len(masks), 0)
    z = jnp.where(jnp.asarray(masks), V, x0)
    nll = -np.take_along_axis(np.asarray(net), np.asarray(x0)[..., None], -1)[..., 0]
    count = masks.sum(1)
    f = np.array([np.mean((nll * masks).sum(1)[count == m]) for m in range(1, L + 1)])
    any_order = float(np.sum(f / np.arange(1, L + 1)))

    def expected(terms):
        return _expectation_over_t(
            lambda t: float(np.sum(np.asarray(terms(t)) * t**count * (1 - t) ** (L - count))), L
        )

    proc = discrete.MaskedProcess(vocab_size=V)
    dce = expected(lambda lam: discrete.lambda_dce_terms(net, x0, z, jnp.full((len(z),), lam), mask_index=V))
    mdlm = expected(lambda t: discrete.mdlm_terms(proc, net, x0, z, jnp.full((len(z),), t)))
    np.testing.assert_allclose(dce, any_order, rtol=1e-5)
    np.testing.assert_allclose(mdlm, any_order, rtol=1e-5)
    # mask_sampling="count": k uniform on 1..L, then one of the C(L, k) masks of size k, weight L/k
    some = count > 0
    by_count = discrete.lambda_dce_terms(net[some], x0[some], z[some], count[some] / L, mask_index=V)
    prob = 1.0 / (L * np.array([math.comb(L, m) for m in count[some]]))
    np.testing.assert_allclose(float(np.sum(np.asarray(by_count) * prob)), any_order, rtol=1e-5)


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_d3pm_bound_terms_vanish_for_a_perfect_predictor(kind):
    proc = discrete.d3pm(kind, vocab_size=V, num_steps=20)
    b, length = 20, 6
    x0 = jax.random.randint(jax.random.key(0), (b, length), 0, V)
    t = jnp.arange(1, b + 1)
    x_t = discrete.d3pm_sample(proc, x0, t, jax.random.key(1))
    perfect = jnp.where(jax.nn.one_hot(x0, proc.num_states) > 0, 30.0, -30.0)
    terms_fn = jax.jit(discrete.d3pm_terms)  # one compile instead of an op-by-op run, twice
    terms = terms_fn(proc, perfect, x0, x_t, t)
    np.testing.assert_allclose(terms["vlb_t"], 0.0, atol=1e-4)
    np.testing.assert_allclose(terms["ce"], 0.0, atol=1e-4)
    wrong = terms_fn(proc, -perfect, x0, x_t, t)
    assert float(jnp.sum(wrong["vlb_t"])) > 1.0  # a wrong predictor pays
    if kind == "absorbing":  # x_T is all-mask whatever x_0 was: no prior term
        np.testing.assert_allclose(terms["prior"], 0.0, atol=1e-6)


def test_make_loss_refuses_the_wrong_process():
    apply_fn = lambda *a: None
    with pytest.raises(ValueError, match="needs MaskedProcess"):
        discrete.make_loss(discrete.d3pm("uniform", vocab_size=3, num_steps=4), apply_fn, loss="mdlm")
    with pytest.raises(ValueError, match="vocab_size"):
        discrete.make_loss(None, apply_fn, loss="autoregressive")
    with pytest.raises(ValueError, match="mask_sampling 'count'.*not loss 'sedd'"):
        discrete.make_loss(discrete.MaskedProcess(vocab_size=3), apply_fn, loss="sedd", mask_sampling="count")
