"""The JVP family against exact answers on the analytic mixture: the sCM tangent of the exact TrigFlow
consistency model vanishes (to the reference map's discretisation, falling at its order), the
consistency function is the identity at t = 0 bitwise, the tangent is float32 for a bfloat16 network,
and the exact shortcut of the float64 flow satisfies 2d = d o d."""

import jax
import jax.numpy as jnp
import numpy as np

from diffax import schedules
from diffax.fewstep import scm, shortcut
from diffax.samplers.exact import reference_flow, toy_mixture

MIXTURE = toy_mixture()
SIGMA_DATA = 0.5
TRIG = schedules.get("trigflow", sigma_data=SIGMA_DATA)
EPS = MIXTURE.model_fn(TRIG, prediction="eps")


def _velocity(x, t):
    """The exact TrigFlow probability-flow velocity E[cos t z - sin t x_0 | x_t = x], z = sigma_d eps."""
    eps = EPS(x, t)
    cos, sin = jnp.cos(t)[:, None], jnp.sin(t)[:, None]
    x0 = (x - SIGMA_DATA * sin * eps) / cos
    return cos * SIGMA_DATA * eps - sin * x0


def _exact_network(num_steps):
    """F(y, t) of the exact consistency model: f = Phi_{t -> 1e-3}(x) by Heun (differentiable in x and t;
    the schedule's sigma = sigma_d sin t has a log-derivative of 1 / t at 0), F = (cos t x - f) /
    (sin t sigma_d) with x = sigma_d y."""

    def network(y, t):
        x = SIGMA_DATA * y
        h = ((1e-3 - t) / jnp.asarray(num_steps, t.dtype))[:, None]

        def step(i, z):
            tau = t + i * h[:, 0]
            slope = _velocity(z, tau)
            return z + 0.5 * h * (slope + _velocity(z + h * slope, tau + h[:, 0]))

        f = jax.lax.fori_loop(0, num_steps, step, x)
        return (jnp.cos(t)[:, None] * x - f) / (jnp.sin(t)[:, None] * SIGMA_DATA)

    return network


def test_the_scm_tangent_of_the_exact_trigflow_model_vanishes():
    n = 256
    key = jax.random.key(0)
    x0 = jnp.asarray(MIXTURE.sample(np.random.default_rng(0), n), jnp.float32)
    t = jax.random.uniform(key, (n,), minval=0.3, maxval=1.2)
    x_t = jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * SIGMA_DATA * jax.random.normal(
        jax.random.fold_in(key, 1), (n, 2)
    )
    dxt_dt = _velocity(x_t, t)  # sCD with the exact teacher
    tangent = jax.jit(  # the step count traced: one program for both
        lambda x, t, v, steps: scm.tangent(
            _exact_network(steps), x, t, v, sigma_data=SIGMA_DATA, normalization=None
        )[1]
    )
    residual = {
        steps: float(jnp.sqrt(jnp.mean(jnp.sum(tangent(x_t, t, dxt_dt, steps) ** 2, -1))))
        for steps in (8, 32)
    }
    # Against the scale of the raw tangent's parts (cos^2 t (sigma_d F - dx/dt) is O(1) here).
    assert residual[32] < 2e-3 and residual[8] / residual[32] > 8, residual  # Heun: order 2
    # The same model's tangent with the conditional velocity of one (x_0, z) draw (sCT) is not zero.
    dxt_ct = (
        jnp.cos(t)[:, None] * (x_t - jnp.cos(t)[:, None] * x0) / jnp.sin(t)[:, None]
        - jnp.sin(t)[:, None] * x0
    )
    ct = tangent(x_t, t, dxt_ct, 32)
    assert float(jnp.sqrt(jnp.mean(jnp.sum(ct**2, -1)))) > 0.1


def test_boundary_is_the_identity_and_tangents_are_float32_for_bfloat16_networks():
    x = jax.random.normal(jax.random.key(1), (16, 4, 4, 1))
    out = jax.random.normal(jax.random.key(2), x.shape)
    f = scm.consistency_function(out, x, jnp.zeros((16,)), sigma_data=SIGMA_DATA)
    np.testing.assert_array_equal(f, x)  # cos 0 = 1 and sin 0 = 0 exactly in float32
    weights = jax.random.normal(jax.random.key(3), (16, 16)) / 4.0

    def network(dtype):
        def apply(y, t):
            h = jnp.tanh(y.reshape(16, -1).astype(dtype) @ weights.astype(dtype))
            return (h * jnp.cos(t)[:, None].astype(dtype)).reshape(y.shape)

        return apply

    t = jnp.linspace(0.2, 1.4, 16)
    v = jax.random.normal(jax.random.key(4), x.shape)
    out32, g32 = scm.tangent(network(jnp.float32), x, t, v, sigma_data=SIGMA_DATA)
    out16, g16 = scm.tangent(network(jnp.bfloat16), x.astype(jnp.bfloat16), t, v, sigma_data=SIGMA_DATA)
    assert out16.dtype == g16.dtype == jnp.float32
    np.testing.assert_allclose(g16, g32, atol=0.03)
    loss, error = scm.scm_loss(
        network(jnp.bfloat16), network(jnp.float32), scm.init_logvar(), x, v, t, sigma_data=SIGMA_DATA
    )
    assert loss.dtype == error.dtype == jnp.float32 and loss.shape == (16,)
    np.testing.assert_allclose(loss, error, rtol=1e-6)  # w(t) = 0 at initialisation: e^0 error + 0


def test_the_exact_shortcut_satisfies_two_d_equals_d_after_d():
    rf = schedules.get("rectified_flow")
    n = 128
    x = np.random.default_rng(5).standard_normal((n, 2)) * 0.9

    def flow(z, t, r):
        """Phi_{t -> r}(z) in float64 (y = x / alpha: every schedule's flow is the variance-exploding one)."""
        with jax.enable_x64(True):
            lsnr = [float(rf.log_snr(np.float64(u))) for u in (t, r)]
            alpha = [float(rf.alpha(np.float64(u))) for u in (t, r)]
        return alpha[1] * reference_flow(MIXTURE, z / alpha[0], *lsnr, variance_preserving=False)

    def exact_s(z, t, d):
        """s(z, t, d) = (z - Phi_{t -> t - d}(z)) / d for scalar t, d (host float64)."""
        return (z - flow(z, t, t - d)) / d

    def s_fn(z, t, d):
        call = lambda z, t, d: exact_s(np.asarray(z, np.float64), float(t[0]), float(d[0])).astype(np.float32)
        return jax.pure_callback(call, jax.ShapeDtypeStruct(z.shape, jnp.float32), z, t, d)

    t, d = 0.9, 0.2
    target = shortcut.self_consistency_target(
        s_fn, jnp.asarray(x, jnp.float32), jnp.full((n,), t), jnp.full((n,), d)
    )
    two = exact_s(x, t, 2 * d)
    assert target.dtype == jnp.float32
    np.testing.assert_allclose(target, two, atol=5e-5)  # float32 round-off of two float64 maps
    assert np.max(np.abs(exact_s(x, t, d) - two)) > 1e-2  # the flow bends: one step of d is not 2d
    # The self-consistency draws: 2d a power of two >= 2 min_step, t on its grid, t - 2d >= 0.
    t_draw, d_draw = shortcut.step_sizes(jax.random.key(6), 4096, min_step=1.0 / 128)
    big = np.asarray(2 * d_draw)
    assert set(np.round(np.log2(big)).astype(int)) == set(range(-6, 1))
    np.testing.assert_allclose(np.asarray(t_draw) / big, np.round(np.asarray(t_draw) / big), atol=1e-5)
    assert np.all(np.asarray(t_draw) - big >= -1e-7) and np.all(np.asarray(t_draw) <= 1.0 + 1e-7)
