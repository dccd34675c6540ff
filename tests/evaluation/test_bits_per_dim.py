"""Bits/dim of discretized Gaussian data under its exact model, by the VLB and by the ODE, against the
data's entropy (the floor any model reaches)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffax import evaluation, schedules
from diffax.process import broadcast_to_data

STD = 0.25  # 4 standard deviations inside [-1, 1]: the edge bins hold almost nothing
DIM = 8


def discretized_gaussian_entropy_bits(std: float) -> float:
    """Entropy of round-to-256-levels N(0, std^2) data on [-1, 1], per dimension, in bits."""
    edges = (np.arange(257) - 0.5) / 255 * 2 - 1
    edges[0], edges[-1] = -np.inf, np.inf
    p = np.diff(stats.norm.cdf(edges, scale=std))
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def exact_eps_model(schedule):
    """E[eps | x_t] for x0 ~ N(0, STD^2 I): eps_hat = sigma / (alpha^2 s^2 + sigma^2) x_t."""

    def model_fn(x_t, t):
        a = broadcast_to_data(schedule.alpha(t), x_t)
        s = broadcast_to_data(schedule.sigma(t), x_t)
        return s / (a**2 * STD**2 + s**2) * x_t

    return model_fn


def exact_learned_variance_model(schedule):
    """eps_hat and the exact reverse variance Var[x_{t-1} | x_t] of Gaussian data, expressed in improved
    DDPM's interpolation between log beta~_t and log beta_t (Nichol & Dhariwal 2021, eq. 15)."""
    eps_model = exact_eps_model(schedule)
    betas, abar = schedule.betas, schedule.alphas_cumprod
    abar_prev = jnp.concatenate([jnp.ones((1,)), abar[:-1]])
    var_prev = abar_prev * STD**2 + 1 - abar_prev
    var_t = abar * STD**2 + 1 - abar
    true_var = var_prev - (1 - betas) * var_prev**2 / var_t
    tilde = betas * (1 - abar_prev) / (1 - abar)
    log_tilde = jnp.log(jnp.concatenate([tilde[1:2], tilde[1:]]))
    frac = (jnp.log(true_var) - log_tilde) / (jnp.log(betas) - log_tilde)

    def model_fn(x_t, t):
        index = jnp.round(schedule.index_from_t(t)).astype(jnp.int32)
        v = broadcast_to_data(2 * frac[index] - 1, x_t) * jnp.ones_like(x_t)
        return jnp.concatenate([eps_model(x_t, t), v], axis=-1)

    return model_fn


@pytest.fixture(scope="module")
def test_split():
    x = STD * np.random.default_rng(0).standard_normal((384, DIM))
    return np.clip(np.round((x + 1) / 2 * 255), 0, 255) / 255 * 2 - 1


def test_vlb_and_ode_bits_per_dim_bound_the_entropy_tightly(test_split):
    entropy = discretized_gaussian_entropy_bits(STD)
    sched = schedules.get("linear", num_timesteps=1000)
    vlb = evaluation.bits_per_dim(
        exact_learned_variance_model(sched),
        sched,
        test_split,
        method="vlb",
        key=jax.random.key(1),
        batch_size=192,
        learned_variance=True,
    )
    ode = evaluation.bits_per_dim(
        exact_eps_model(sched), sched, test_split, method="ode", key=jax.random.key(2), trace="exact"
    )
    assert vlb["num_images"] == ode["num_images"] == 384
    # Both are upper bounds on the discrete NLL, and the exact model makes them tight.
    for result, slack in ((vlb, 0.08), (ode, 0.08)):
        lower = entropy - 4 * result["bpd_sem"]
        assert lower < result["bpd"] < entropy + slack + 4 * result["bpd_sem"], (result, entropy)
    assert ode["nfe"] > 0


def test_a_wrong_model_costs_bits(test_split):
    """The fixed small variance (DDPM's sigma_t^2 = beta~_t) loosens the bound, and a wrong mean
    (1.5x the noise) loosens it much more; both stay above the entropy."""
    sched = schedules.get("linear", num_timesteps=1000)
    exact = exact_eps_model(sched)
    wrong = lambda x, t: 1.5 * exact(x, t)
    good = evaluation.bits_per_dim(exact, sched, test_split, method="vlb", key=jax.random.key(0))
    bad = evaluation.bits_per_dim(wrong, sched, test_split, method="vlb", key=jax.random.key(0))
    entropy = discretized_gaussian_entropy_bits(STD)
    assert entropy < good["bpd"] and good["bpd"] + 0.5 < bad["bpd"]


def test_bad_arguments_raise():
    vp = schedules.get("vp_linear")
    with pytest.raises(ValueError, match="method='vlb' needs a discrete schedule"):
        evaluation.bits_per_dim(lambda x, t: x, vp, jnp.zeros((2, 3)), method="vlb", key=jax.random.key(0))
    with pytest.raises(ValueError, match="Unknown bits/dim method 'elbo'"):
        evaluation.bits_per_dim(lambda x, t: x, vp, jnp.zeros((2, 3)), method="elbo", key=jax.random.key(0))
    assert math.isfinite(discretized_gaussian_entropy_bits(STD))
