"""The LDM autoencoder loss against truth: the KL's closed form and Monte Carlo, the adaptive weight
against explicit gradients (and without a gradient of its own), hinge losses on hand values, the
discriminator start, and the train step keeping the discriminator still before it."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffax import models, train_state
from diffax.autoencoding import losses, system
from diffax.autoencoding.discriminator import PatchDiscriminator
from experiments import mixture


def test_kl_matches_hand_values_and_monte_carlo():
    assert float(losses.kl_to_standard_normal(jnp.zeros((1, 3)), jnp.zeros((1, 3)))[0]) == 0.0
    # One dimension, mean 1, variance e: 0.5 (1 + e - 1 - 1) = 0.5 (e - 1).
    np.testing.assert_allclose(
        losses.kl_to_standard_normal(jnp.ones((1, 1)), jnp.ones((1, 1))), [0.5 * (np.e - 1)], rtol=1e-6
    )
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, 2, 2, 3)) * 0.7
    logvar = rng.normal(size=(2, 2, 2, 3)) * 0.5
    closed = np.asarray(losses.kl_to_standard_normal(mean, logvar))
    n = 200_000
    std = np.exp(0.5 * logvar)
    z = mean[None] + std[None] * rng.standard_normal((n, *mean.shape))
    log_q = -0.5 * (np.square((z - mean) / std) + logvar + np.log(2 * np.pi))
    log_p = -0.5 * (np.square(z) + np.log(2 * np.pi))
    per_draw = (log_q - log_p).reshape(n, 2, -1).sum(-1)
    monte_carlo, stderr = per_draw.mean(0), per_draw.std(0) / np.sqrt(n)
    assert np.all(np.abs(monte_carlo - closed) < 4 * stderr), (monte_carlo, closed, stderr)


def test_hinge_and_generator_losses_on_hand_values():
    real = jnp.array([2.0, 0.5, -1.0, 1.0])  # relu(1 - real) = 0, 0.5, 2, 0 -> mean 0.625
    fake = jnp.array([-3.0, 0.0, 0.5, -0.5])  # relu(1 + fake) = 0, 1, 1.5, 0.5 -> mean 0.75
    np.testing.assert_allclose(losses.hinge_discriminator_loss(real, fake), 0.5 * (0.625 + 0.75), rtol=1e-6)
    np.testing.assert_allclose(losses.generator_loss(fake), 0.75, rtol=1e-6)


def test_reconstruction_nll_sums_over_pixels_with_the_log_variance():
    x = jnp.zeros((2, 2, 2, 1))
    x_rec = jnp.full((2, 2, 2, 1), 0.5)
    # per pixel 0.5 / e + 1; 8 pixels / batch 2 -> 4 (0.5 / e + 1)
    np.testing.assert_allclose(losses.reconstruction_nll(x, x_rec, 1.0), 4 * (0.5 / np.e + 1), rtol=1e-6)


def test_discriminator_factor_starts_at_disc_start():
    factors = [float(losses.discriminator_factor(s, disc_start=3, disc_factor=0.7)) for s in range(5)]
    assert factors == [0.0, 0.0, 0.0, pytest.approx(0.7), pytest.approx(0.7)]


def test_adaptive_weight_is_the_gradient_norm_ratio_and_has_no_gradient():
    a, b = jnp.array([3.0, 4.0]), jnp.array([[0.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(losses.adaptive_weight(a, b, disc_weight=0.5), 0.5 * 5 / (1 + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(losses.adaptive_weight(a, 0 * b, disc_weight=1.0), 1e4)  # clipped
    grads = jax.grad(lambda a, b: losses.adaptive_weight(a, b, disc_weight=0.5), argnums=(0, 1))(a, b)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def _tiny_config(disc_start=2):
    """The tests' tiny autoencoder run (``experiments/mixture.py:vae``) with its discriminator from
    ``disc_start`` on."""
    config = mixture.get_config("vae")
    config.loss.disc_start = disc_start
    return config


@functools.cache
def _tiny_run():
    config = _tiny_config()
    parts = train_state.build(config)
    state = jax.jit(lambda: nn.meta.unbox(train_state.state_initializer(config, parts)()))()
    return config, parts, state


def _images(seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=(4, 8, 8, 1)), jnp.float32)


def test_adaptive_weight_in_the_objective_equals_explicit_last_layer_gradients():
    config, parts, state = _tiny_run()
    disc = system.build_discriminator(config)
    settings = system.loss_settings(config)
    x, key = _images(), jax.random.key(3)
    _, aux = jax.jit(functools.partial(system.generator_objective, parts.module, disc, settings))(
        state.params, state.disc_params, x, key, jnp.float32(1.0)
    )
    ae = state.params["autoencoder"]

    def reconstruct(kernel):  # the same posterior draw, the kernel of decoder.conv_out explicit
        mean, logvar = parts.module.apply({"params": ae}, x, True, method="encode")
        z = system._sample(mean, logvar, key)
        params = system._with_last_layer(ae, kernel)
        return parts.module.apply({"params": params}, z, True, method="decode")

    kernel = ae["decoder"]["conv_out"]["kernel"]
    nll_grad = jax.grad(lambda k: losses.reconstruction_nll(x, reconstruct(k), state.params["logvar"]))(
        kernel
    )
    gan_grad = jax.grad(
        lambda k: losses.generator_loss(disc.apply({"params": state.disc_params}, reconstruct(k)))
    )(kernel)
    expected = 0.5 * np.linalg.norm(nll_grad) / (np.linalg.norm(gan_grad) + 1e-4)
    np.testing.assert_allclose(aux["d_weight"], expected, rtol=1e-4)


def test_train_step_keeps_the_discriminator_still_before_disc_start():
    config, parts, state = _tiny_run()  # disc_start = 2
    step = jax.jit(system.make_train_step(config, parts))
    batch = {"image": _images(1)}
    disc_before = state.disc_params
    for expected_factor in (0.0, 0.0, 1.0):
        new, metrics = step(state, batch)
        assert float(metrics["disc_factor"]) == expected_factor
        moved = jax.tree.leaves(
            jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.disc_params, disc_before)
        )
        assert (max(moved) > 0) == (expected_factor > 0)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
        state, disc_before = new, new.disc_params


def test_patch_discriminator_gives_patch_logits():
    disc = PatchDiscriminator(channels=8, n_layers=2)
    shape = jax.eval_shape(lambda: disc.init_with_output(jax.random.key(0), jnp.zeros((2, 32, 32, 1)))[0])
    assert shape.shape == (2, 6, 6, 1)  # 32 -s2-> 16 -s2-> 8 -s1-> 7 -s1-> 6


def test_an_autoencoder_run_with_a_bad_model_is_one_line():
    config = _tiny_config()
    config.model = ml_collections.ConfigDict(dict(name="dit_s_2"))
    with pytest.raises(ValueError, match="config.model.name: 'dit_s_2' is not an autoencoder"):
        system.check(config)
    config = _tiny_config()
    config.loss.perceptual_weight = 1.0  # without its weights file
    with pytest.raises(ValueError, match="config.loss.lpips_weights"):
        system.check(config)
    assert isinstance(models.from_config(_tiny_config().model), models.AutoencoderKL)
