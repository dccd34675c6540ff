"""Token samplers: caching draws the same distribution with fewer evaluations, oracles are reproduced,
float64 categorical draws."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffax import discrete
from diffax.data import markov
from diffax.discrete import samplers

V, L = 3, 3


@pytest.fixture(scope="module")
def exact_model():
    """The exact conditionals p(x_i | unmasked part of z) of a Markov source, as a time-free weights_fn."""
    source = markov.markov_source(vocab_size=V, order=1, seed=4, concentration=1.0)
    seqs = np.array(list(itertools.product(range(V), repeat=L)))
    p = np.exp(source.log_prob(seqs))
    zs = np.array(list(itertools.product(range(V + 1), repeat=L)))  # every partially masked sequence
    consistent = ((zs[:, None, :] == seqs[None]) | (zs[:, None, :] == V)).all(-1)  # (Z, S)
    table = np.einsum("zs,siy->ziy", consistent * p[None], np.eye(V)[seqs])
    table = table / np.maximum(table.sum(-1, keepdims=True), 1e-30)
    table = jnp.asarray(table, jnp.float32)
    powers = jnp.asarray((V + 1) ** np.arange(L - 1, -1, -1))

    def weights_fn(z, t):
        del t
        return table[(z * powers[None]).sum(-1)]

    return weights_fn, seqs, p


def _histogram(tokens):
    index = (np.asarray(tokens) * V ** np.arange(L - 1, -1, -1)).sum(-1)
    return np.bincount(index, minlength=V**L)


def test_caching_sampler_draws_the_same_distribution_with_fewer_evaluations(exact_model):
    weights_fn, _, p = exact_model
    proc = discrete.MaskedProcess(vocab_size=V)
    n, steps = 3000, 24

    @jax.jit
    def run(key):
        plain = discrete.sample(weights_fn, proc, (n, L), sampler="masked_ancestral", steps=steps, key=key)
        cached = discrete.sample(
            weights_fn, proc, (n, L), sampler="masked_ancestral", steps=steps, key=key, cache=True
        )
        other = discrete.sample(
            weights_fn,
            proc,
            (n, L),
            sampler="masked_ancestral",
            steps=steps,
            key=jax.random.fold_in(key, 1),
            cache=True,
        )
        return plain, cached, other

    (plain, plain_info), (cached, cached_info), (other, _) = run(jax.random.key(0))
    # the same key gives the same draws: the cache only skips evaluations whose output is known
    np.testing.assert_array_equal(plain, cached)
    assert float(plain_info["nfe"]) == steps
    assert 0 < float(cached_info["nfe"]) < steps / 2  # L = 3 tokens: most steps change nothing
    # fixed seeds, independent draws: a two-sample chi-square test of the 27 outcomes
    table = np.stack([_histogram(plain), _histogram(other)])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table)[1] > 1e-3
    # and both are close to the source itself (few tokens are revealed together at 24 steps for L = 3)
    assert stats.chisquare(_histogram(other), p * n)[1] > 1e-3


@pytest.mark.parametrize(
    "process, sampler",
    [
        (discrete.d3pm("uniform", vocab_size=5, num_steps=50), "d3pm_ancestral"),
        (discrete.d3pm("absorbing", vocab_size=5, num_steps=50), "d3pm_ancestral"),
        (discrete.MaskedProcess(vocab_size=5), "tau_leaping"),
    ],
)
def test_samplers_reproduce_a_point_mass(process, sampler):
    """With p̃(x_0 | z) = δ_c (data always c) every sampler must end exactly at c."""
    target = jnp.array([[4, 0, 3, 1, 2, 2, 0]])
    k = getattr(process, "num_states", 5) if sampler == "d3pm_ancestral" else 5

    def weights_fn(z, t):
        del t
        return jnp.broadcast_to(jax.nn.one_hot(target, k) + 1e-12, (*z.shape, k))

    out, info = discrete.sample(
        weights_fn, process, (16, 7), sampler=sampler, steps=10, key=jax.random.key(1)
    )
    np.testing.assert_array_equal(out, jnp.broadcast_to(target, (16, 7)))
    assert float(info["nfe"]) == 10


def test_autoregressive_sampler_draws_the_source(exact_model):
    _, seqs, p = exact_model
    joint = jnp.asarray(p.reshape((V,) * L), jnp.float32)

    def logits_fn(inputs):  # p(x_l | x_<l) of the source, from the BOS-shifted inputs
        x = inputs[:, 1:]
        rows = []
        for pos in range(L):
            marg = joint.sum(axis=tuple(range(pos + 1, L))) if pos + 1 < L else joint
            prefix = (
                marg[tuple(x[:, j] for j in range(pos))] if pos else jnp.broadcast_to(marg, (x.shape[0], V))
            )
            rows.append(jnp.log(prefix / prefix.sum(-1, keepdims=True)))
        return jnp.stack(rows, 1)

    n = 3000
    out, info = jax.jit(lambda k: samplers.sample_autoregressive(logits_fn, (n, L), bos=V, key=k))(
        jax.random.key(2)
    )
    assert float(info["nfe"]) == L
    assert stats.chisquare(_histogram(out), p * n)[1] > 1e-3


def _gumbel_argmax_f64(log_weights: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The float64 reference: ``argmax(log w - log(-log u))``, ``u = (k + 1/2) / 2^52`` from 52 bits."""
    k = (bits[..., 0] >> np.uint32(6)).astype(np.float64) * 2.0**26 + (bits[..., 1] >> np.uint32(6))
    u = (k + 0.5) / 2.0**52
    return np.argmax(np.asarray(log_weights, np.float64) - np.log(-np.log(u)), axis=-1)


def test_float64_categorical():
    probs = jnp.array([0.05, 0.15, 0.3, 0.5])
    draws = np.asarray(jax.jit(discrete.categorical_f64)(jax.random.key(3), jnp.tile(probs, (20000, 1))))
    assert stats.chisquare(np.bincount(draws, minlength=4), np.asarray(probs) * 20000)[1] > 1e-3
    # The device draws equal float64 Gumbel-argmax of the same bits, the tails included: uniform bits and
    # bits at both extremes of the 52-bit range.
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, (4000, 6, 2), dtype=np.uint32)
    bits[:1000, :, 0] = rng.choice(np.array([0, 63, 2**32 - 64, 2**32 - 1], np.uint32), (1000, 6))
    log_w = np.log(rng.dirichlet(np.full(6, 0.3), 4000) + 1e-30).astype(np.float32)
    got = np.asarray(jax.jit(samplers._gumbel_argmax)(log_w, bits))
    np.testing.assert_array_equal(got, _gumbel_argmax_f64(log_w, bits))
    # 52-bit uniforms reach Gumbel values that float32 uniforms cannot (-log(-log(1 - 2^-24)) ≈ 16.6)
    # token 0 (weight 1e-15) with the largest uniform, 1 - 2^-53 (Gumbel 36.7), beats token 1 (weight 1)
    # with u = 1/2 (Gumbel 0.37); float32 Gumbel noise never exceeds 16.6, so token 0 could never win
    bits = np.array([[[0xFFFFFFFF, 0xFFFFFFFF], [0x80000000, 0x00000000]]], np.uint32)
    for weight, token in ((1e-15, 0), (1e-17, 1)):
        log_w = np.log(np.array([[weight, 1.0]], np.float32))
        assert int(samplers._gumbel_argmax(log_w, bits)[0]) == token == _gumbel_argmax_f64(log_w, bits)[0]
    assert float(discrete.sample_entropy(jnp.array([[0, 0, 1, 1]]), 3)) == pytest.approx(np.log(2.0))
