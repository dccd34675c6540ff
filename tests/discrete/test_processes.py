"""D3PM transitions, cumulative products and posteriors against explicit float64 products and Bayes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import discrete
from diffax.discrete import processes


def _one_step_matrices(kind: str, vocab: int, steps: int) -> list[np.ndarray]:
    """Q_1..Q_T in float64 straight from the betas (Austin et al. App. A.2)."""
    k = vocab + (kind == "absorbing")
    out = []
    for beta in processes.d3pm_betas(kind, steps):
        if kind == "uniform":
            out.append((1 - beta) * np.eye(k) + beta / k * np.ones((k, k)))
        else:
            out.append((1 - beta) * np.eye(k) + beta * np.outer(np.ones(k), np.eye(k)[vocab]))
    return out


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_rows_sum_to_one_and_cumulative_products(kind):
    vocab, steps = 4, 12
    proc = discrete.d3pm(kind, vocab_size=vocab, num_steps=steps)
    ts = jnp.arange(1, steps + 1)
    one_step = np.asarray(discrete.transition(proc, ts - 1, ts), np.float64)
    cumulative = np.asarray(discrete.transition(proc, jnp.zeros_like(ts), ts), np.float64)
    np.testing.assert_allclose(one_step.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(cumulative.sum(-1), 1.0, atol=1e-6)
    explicit = _one_step_matrices(kind, vocab, steps)
    product = np.eye(proc.num_states)
    for t in range(steps):
        product = product @ explicit[t]
        np.testing.assert_allclose(one_step[t], explicit[t], atol=1e-6)
        np.testing.assert_allclose(cumulative[t], product, atol=1e-5)


def test_absorbing_end_is_all_mask():
    proc = discrete.d3pm("absorbing", vocab_size=5, num_steps=7)
    q_T = np.asarray(discrete.transition(proc, 0, 7))
    np.testing.assert_array_equal(q_T, np.tile(np.eye(6)[5], (6, 1)))
    x0 = jnp.arange(5)[None].repeat(3, 0)
    assert np.all(np.asarray(discrete.d3pm_sample(proc, x0, jnp.full((3,), 7), jax.random.key(0))) == 5)


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_posterior_is_bayes(kind):
    """q(x_s | x_t, x_0) = Q_{t|s}[x_s, x_t] Q̄_s[x_0, x_s] / Q̄_t[x_0, x_t] from explicit matrices."""
    vocab, steps = 3, 5
    proc = discrete.d3pm(kind, vocab_size=vocab, num_steps=steps)
    k = proc.num_states
    explicit = _one_step_matrices(kind, vocab, steps)

    def chain(a, b):  # Q_{b|a} as the product of one-step matrices a+1..b
        m = np.eye(k)
        for i in range(a, b):
            m = m @ explicit[i]
        return m

    rows = [
        (x0, xt, s, t)
        for x0 in range(vocab)
        for xt in range(k)
        for t in range(1, steps + 1)
        for s in range(t)
    ]
    rows = [r for r in rows if chain(0, r[3])[r[0], r[1]] > 0]  # x_t reachable from x_0
    x0, xt, s, t = (np.array(c) for c in zip(*rows, strict=True))
    logits = discrete.d3pm_posterior_logits(
        proc, jax.nn.one_hot(x0[:, None], k), xt[:, None], jnp.asarray(s), jnp.asarray(t)
    )
    got = np.asarray(jax.nn.softmax(logits))[:, 0]
    for row, (a, b, ss, tt) in enumerate(rows):
        bayes = chain(ss, tt)[:, b] * chain(0, ss)[a, :] / chain(0, tt)[a, b]
        np.testing.assert_allclose(got[row], bayes, atol=2e-6, err_msg=f"x0={a} x_t={b} s={ss} t={tt}")


def test_masked_process_marginal_and_antithetic_strata():
    proc = discrete.MaskedProcess(vocab_size=4)
    x0 = jnp.zeros((4, 20000), jnp.int32)
    t = jnp.array([0.1, 0.4, 0.7, 1.0])
    frac = np.asarray((discrete.masked_sample(proc, x0, t, jax.random.key(1)) == 4).mean(1))
    np.testing.assert_allclose(frac, 1 - np.asarray(proc.alpha(t)), atol=0.012)
    ts = np.sort(np.asarray(discrete.antithetic_times(jax.random.key(3), 16)))
    assert np.all(ts > 0) and np.all(ts <= 1)
    np.testing.assert_array_equal(np.ceil(ts * 16).astype(int), np.arange(1, 17))


def test_mask_counts_are_exact_stratified_and_uniform_over_positions():
    proc = discrete.MaskedProcess(vocab_size=4)
    counts = discrete.stratified_counts(jax.random.key(4), 12, 12)  # n = L: every count once
    np.testing.assert_array_equal(np.sort(np.asarray(counts)), np.arange(1, 13))
    count = jnp.tile(jnp.array([1, 3, 7, 12]), 1500)
    x0 = jnp.zeros((len(count), 12), jnp.int32)
    z = np.asarray(discrete.masked_sample_count(proc, x0, count, jax.random.key(5)))
    np.testing.assert_array_equal((z == 4).sum(1), np.asarray(count))
    per_position = (z == 4).reshape(1500, 4, 12).mean(0)  # each position masked w.p. k / L
    expected = np.broadcast_to(np.array([1.0, 3.0, 7.0, 12.0])[:, None] / 12, per_position.shape)
    np.testing.assert_allclose(per_position, expected, atol=0.04)


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_d3pm_sample_marginal(kind):
    proc = discrete.d3pm(kind, vocab_size=3, num_steps=10)
    t = 6
    x = discrete.d3pm_sample(proc, jnp.ones((1, 60000), jnp.int32), jnp.array([t]), jax.random.key(2))
    freq = np.bincount(np.asarray(x)[0], minlength=proc.num_states) / 60000
    np.testing.assert_allclose(freq, np.asarray(discrete.transition(proc, 0, t))[1], atol=0.01)
