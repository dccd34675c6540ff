"""Losses: each at its analytic minimum for the exact predictor on Gaussian data, the VLB against its
closed form, weights against the papers' formulas, and clear errors for bad settings."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import losses, process, schedules
from diffax import parameterization as P

DATA_STD = 0.6  # x0 ~ N(0, DATA_STD^2 I)
DIM = 64


def posterior_x0_var(sch, t, data_std=DATA_STD):
    """Var[x0 | x_t] per dimension for Gaussian data: s^2 sigma^2 / (alpha^2 s^2 + sigma^2)."""
    a2, s2 = sch.alpha(t) ** 2, sch.sigma(t) ** 2
    return data_std**2 * s2 / (a2 * data_std**2 + s2)


def exact_apply_fn(sch, prediction, data_std=DATA_STD):
    """The Bayes-optimal network for Gaussian data: the target evaluated at (E[x0|x_t], E[eps|x_t])."""

    def apply_fn(params, x_t, t, cond, key):
        del params, cond, key
        a = process.broadcast_to_data(sch.alpha(t), x_t)
        s = process.broadcast_to_data(sch.sigma(t), x_t)
        x0_mean = a * data_std**2 / (a**2 * data_std**2 + s**2) * x_t
        eps_mean = (x_t - a * x0_mean) / s
        return P.from_x0_eps(sch, x0_mean, eps_mean, t, prediction=prediction)

    return apply_fn


def gaussian_batch(n=1024, seed=0):
    return {"image": DATA_STD * jax.random.normal(jax.random.key(seed), (n, DIM))}


@pytest.mark.parametrize(
    "sched_name, loss, prediction, weighting",
    [
        ("linear", "simple", "eps", "uniform"),
        ("vp_linear", "simple", "x0", "uniform"),
        ("vp_cosine", "simple", "v", "uniform"),
        ("cosine", "simple", "eps", "min_snr"),
        ("vp_linear", "simple", "v", "min_snr"),
        ("rectified_flow", "flow_matching", "eps", "uniform"),
        ("ve", "simple", "score", "uniform"),
    ],
)
def test_loss_reaches_its_analytic_minimum_for_the_exact_predictor(sched_name, loss, prediction, weighting):
    sch = schedules.get(sched_name)
    target_kind = "flow" if loss == "flow_matching" else prediction
    loss_fn = losses.make_loss(
        sch,
        exact_apply_fn(sch, target_kind),
        loss=loss,
        prediction=prediction,
        weighting=weighting,
        t_eps=1e-2,
    )
    value, aux = jax.jit(loss_fn)(None, gaussian_batch(), jax.random.key(1))
    t = aux["t"]
    # E[||target - E[target|x_t]||^2] = c(t) Var[x0|x_t] per dimension; the weighting multiplies it.
    expected = P.x0_error_scale(sch, t, prediction=target_kind) * posterior_x0_var(sch, t)
    if weighting == "min_snr":
        expected = expected * losses.min_snr_weight(sch, t, prediction=target_kind)
    ratio = np.asarray(aux["loss_per_example"]) / np.asarray(expected)
    # each ratio is a chi-square(DIM) / DIM draw: mean 1, standard error sqrt(2 / DIM / n)
    assert abs(ratio.mean() - 1.0) < 5 * math.sqrt(2 / DIM / ratio.size), ratio.mean()
    assert np.isfinite(float(value))


@pytest.mark.parametrize("loss", ["simple", "edm", "flow_matching"])
def test_loss_is_zero_for_an_oracle_on_a_point_mass(loss):
    """Data is one point: E[x0 | x_t] = x0 exactly, so the exact predictor has zero loss."""
    x_point = jnp.linspace(-1, 1, DIM)
    sch = schedules.get({"simple": "vp_linear", "edm": "edm", "flow_matching": "rectified_flow"}[loss])

    def oracle(params, x_t, t, cond, key):
        if loss == "edm":  # the raw network F = (x0 - c_skip x) / c_out, with x = x_t / c_in
            sigma = jnp.exp(4 * t)
            c_skip, c_out, c_in, _ = P.edm_preconditioning(sigma, sigma_data=sch.sigma_data)
            x = x_t / c_in[:, None]
            return (x_point[None] - c_skip[:, None] * x) / c_out[:, None]
        x0 = jnp.broadcast_to(x_point, x_t.shape)
        eps = (x_t - process.broadcast_to_data(sch.alpha(t), x_t) * x0) / process.broadcast_to_data(
            sch.sigma(t), x_t
        )
        return P.from_x0_eps(sch, x0, eps, t, prediction="flow" if loss == "flow_matching" else "eps")

    loss_fn = losses.make_loss(sch, oracle, loss=loss, t_eps=1e-2)
    value, _ = loss_fn(None, {"image": jnp.tile(x_point, (16, 1))}, jax.random.key(0))
    assert float(value) < 1e-6


def test_edm_loss_is_one_at_the_optimum_when_data_std_is_sigma_data():
    """lambda(sigma) Var[x0 | x] = 1 exactly when Var[x0] = sigma_data^2 (Karras et al. 2022, eq. 8)."""
    sch = schedules.get("edm", sigma_data=0.5)

    def exact_raw(params, x_in, c_noise, cond, key):
        sigma = jnp.exp(4 * c_noise)[:, None]
        c_skip, c_out, c_in, _ = P.edm_preconditioning(sigma, sigma_data=0.5)
        x = x_in / c_in
        denoised = 0.25 / (0.25 + sigma**2) * x  # E[x0 | x] for x0 ~ N(0, 0.25)
        return (denoised - c_skip * x) / c_out

    loss_fn = losses.make_loss(sch, exact_raw, loss="edm")
    batch = {"image": 0.5 * jax.random.normal(jax.random.key(3), (2048, DIM))}
    value, _ = loss_fn(None, batch, jax.random.key(4))
    assert abs(float(value) - 1.0) < 5 * math.sqrt(2 / DIM / 2048)


def test_vlb_terms_match_their_closed_form_for_gaussian_data():
    """With the Bayes-optimal x0 prediction and DDPM's fixed posterior variance,
    E[L_{t-1}] = coef_x0^2 Var[x0 | x_t] / (2 beta~_t) nats per dimension (Ho et al. 2020, eq. 5-7)."""
    T = 50
    sch = schedules.get("linear", num_timesteps=T, beta_start=1e-3, beta_end=0.2)
    model_fn = lambda x_t, t: exact_apply_fn(sch, "eps")(None, x_t, t, None, None)
    x0 = gaussian_batch(2048, seed=7)["image"]
    total, parts = jax.jit(
        lambda x, k: losses.vlb_bpd(sch, model_fn, x, k, prediction="eps", clip_denoised=False)
    )(x0, jax.random.key(8))
    betas = np.asarray(sch.betas, np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    coef_x0 = betas * np.sqrt(abar_prev) / (1 - abar)
    var_tilde = betas * (1 - abar_prev) / (1 - abar)
    t = np.arange(1, T + 1) / T
    post_var = np.asarray(posterior_x0_var(sch, jnp.asarray(t, jnp.float32)), np.float64)
    expected = np.zeros(T)
    expected[1:] = (coef_x0**2 * post_var)[1:] / (2 * var_tilde[1:]) / math.log(2)
    measured = np.asarray(parts["terms"]).mean(axis=1)
    np.testing.assert_allclose(measured[1:], expected[1:], rtol=0.03)  # index 0 is the decoder term
    # prior: E KL(N(alpha x0, sigma^2) || N(0, 1)) = (alpha^2 s^2 + sigma^2 - 1 - log sigma^2) / 2
    a2 = abar[-1]
    prior = 0.5 * (a2 * DATA_STD**2 + (1 - a2) - 1 - math.log(1 - a2)) / math.log(2)
    np.testing.assert_allclose(np.asarray(parts["prior"]).mean(), prior, rtol=0.05, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(total), np.asarray(parts["terms"]).sum(0) + np.asarray(parts["prior"]), rtol=1e-5
    )


def test_decoder_term_is_near_zero_for_an_exact_sharp_decoder():
    """Data on the 256 bin centres and a decoder mean equal to it with a tiny variance: ~0 bits."""
    x = (jnp.arange(256.0) / 255.0 * 2 - 1).reshape(1, -1)
    logp = losses.discretized_gaussian_log_likelihood(x, mean=x, log_scale=jnp.full_like(x, -8.0))
    assert float(-jnp.mean(logp)) < 1e-6
    # and a broad decoder spreads mass: the log-probability of one bin is about log(2 / 255 * N(0; 0, 1))
    logp_wide = losses.discretized_gaussian_log_likelihood(
        jnp.zeros((1, 1)), mean=jnp.zeros((1, 1)), log_scale=jnp.zeros((1, 1))
    )
    np.testing.assert_allclose(float(logp_wide[0, 0]), math.log(2 / 255 / math.sqrt(2 * math.pi)), rtol=1e-3)


def test_learned_log_variance_interpolates_between_beta_and_beta_tilde():
    sch = schedules.get("cosine", num_timesteps=100)
    idx = jnp.array([3, 40])
    ones = jnp.ones((2, 5))
    log_beta = np.log(np.asarray(sch.betas)[[3, 40]])
    _, _, log_tilde = process.q_posterior_discrete(sch, ones, ones, idx)
    chex.assert_trees_all_close(losses.learned_log_variance(sch, ones, idx)[:, 0], log_beta, rtol=1e-6)
    chex.assert_trees_all_close(
        losses.learned_log_variance(sch, -ones, idx), jnp.broadcast_to(log_tilde, (2, 5))
    )


def test_hybrid_loss_stops_the_vlb_gradient_into_the_mean():
    """Nichol & Dhariwal 2021, Sec. 3.1: L_vlb trains only the variance; the mean learns from L_simple."""
    sch = schedules.get("linear", num_timesteps=100)
    batch = {"image": jnp.clip(gaussian_batch(32)["image"], -1, 1)}

    def apply_fn(params, x_t, t, cond, key):
        return jnp.concatenate([params["mean"] * x_t, jnp.tanh(params["var"]) * jnp.ones_like(x_t)], axis=-1)

    params = {"mean": jnp.array(0.3), "var": jnp.array(0.2)}
    key = jax.random.key(0)
    hybrid = losses.make_loss(sch, apply_fn, loss="hybrid", learned_variance=True, vlb_weight=10.0)
    simple = losses.make_loss(sch, apply_fn, loss="simple", learned_variance=True)
    g_hybrid = jax.jit(jax.grad(lambda p: hybrid(p, batch, key)[0]))(params)
    g_simple = jax.jit(jax.grad(lambda p: simple(p, batch, key)[0]))(params)
    np.testing.assert_allclose(g_hybrid["mean"], g_simple["mean"], rtol=1e-5)
    assert float(g_simple["var"]) == 0.0 and abs(float(g_hybrid["var"])) > 0.0


def test_min_snr_weights_match_hang_et_al():
    sch = schedules.get("vp_linear")
    t = jnp.linspace(0.02, 0.98, 9)
    snr = jnp.exp(sch.log_snr(t))
    for prediction, expected in [
        ("eps", jnp.minimum(snr, 5.0) / snr),
        ("x0", jnp.minimum(snr, 5.0)),
        ("v", jnp.minimum(snr, 5.0) / (snr + 1)),
    ]:
        chex.assert_trees_all_close(losses.min_snr_weight(sch, t, prediction=prediction), expected, rtol=1e-4)


def test_importance_sampled_times_are_unbiased():
    sch = schedules.get("linear", num_timesteps=10)
    history = jnp.arange(1.0, 11.0)[:, None] ** 2 * jnp.ones((10, 4))
    probs = losses.importance_time_probs(history)
    chex.assert_trees_all_close(jnp.sum(probs), 1.0, rtol=1e-6)
    per_t_loss = jnp.arange(10.0) ** 2
    t, w = losses.sample_time(sch, jax.random.key(0), 200000, probs=probs)
    index = jnp.round(sch.index_from_t(t)).astype(jnp.int32)
    estimate = float(jnp.mean(w * per_t_loss[index]))
    np.testing.assert_allclose(estimate, float(jnp.mean(per_t_loss)), rtol=0.02)


class LossTransformsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_make_loss_jit_vmap_grad_and_bfloat16(self):
        sch = schedules.get("linear", num_timesteps=100)
        apply_fn = lambda p, x, t, c, k: p["w"] * x
        settings = [("simple", {}), ("vlb", {}), ("simple", {"weighting": "min_snr", "prediction": "v"})]
        loss_fns = [losses.make_loss(sch, apply_fn, loss=loss, **kw) for loss, kw in settings]

        def values_and_grads(params, image):
            batch = {"image": image}
            out = [
                jax.value_and_grad(lambda p, f=f: f(p, batch, jax.random.key(0))[0])(params) for f in loss_fns
            ]
            # per-example losses under vmap (a batch of one each) match the batched aux
            per_example = jax.vmap(lambda x: loss_fns[0](params, {"image": x[None]}, jax.random.key(0))[0])(
                image
            )
            return out, per_example

        for dtype in (jnp.float32, jnp.bfloat16):
            image = jnp.full((4, 3, 3, 2), 0.5, dtype)
            out, per_example = self.variant(values_and_grads)({"w": jnp.array(0.1)}, image)
            chex.assert_tree_all_finite((out, per_example))
            chex.assert_shape(per_example, (4,))
            for value, _ in out:
                chex.assert_shape(value, ())


@pytest.mark.parametrize(
    "sched_name, kwargs, match",
    [
        ("linear", {"loss": "l2"}, "Unknown loss 'l2'; known: simple, hybrid, vlb, edm, flow_matching"),
        ("linear", {"prediction": "noise"}, "Unknown prediction 'noise'"),
        ("linear", {"weighting": "snr"}, "Unknown weighting 'snr'"),
        ("vp_linear", {"loss": "vlb"}, "needs a discrete schedule"),
        ("linear", {"loss": "hybrid"}, "set learned_variance=True"),
        ("linear", {"loss": "edm"}, "needs the 'edm' schedule"),
    ],
)
def test_bad_loss_settings_raise(sched_name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.make_loss(schedules.get(sched_name), lambda *a: a[1], **kwargs)


def test_learned_variance_needs_twice_the_channels():
    loss_fn = losses.make_loss(schedules.get("linear"), lambda p, x, t, c, k: x, learned_variance=True)
    with pytest.raises(ValueError, match="2x the data channels"):
        loss_fn(None, {"image": jnp.zeros((2, 4, 4, 3))}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"probs must have shape \(1000,\)"):
        losses.sample_time(schedules.get("linear"), jax.random.key(0), 4, probs=jnp.ones(10) / 10)
