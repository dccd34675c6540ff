"""The LDM autoencoder objective (``contperceptual``): pure functions of arrays.

Generator (autoencoder) loss, per batch:
``nll + kl_weight · KL + d_weight · disc_factor · g_loss``, with
``nll = Σ_pixels (|x − x̂| + w_p · LPIPS) / e^{logvar} + logvar`` divided by the batch size (a sum
over pixels, the scale ``kl_weight = 1e-6`` is chosen against), ``KL`` the diagonal Gaussian
posterior's KL to N(0, I) summed over latent dimensions and averaged over the batch,
``g_loss = −mean D(x̂)``, and the adaptive weight ``‖∇_W nll‖ / (‖∇_W g_loss‖ + 1e-4)`` at the
decoder's last layer W, clipped to [0, 1e4], times ``disc_weight``, without a gradient.
Discriminator loss: ``disc_factor · ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))``.
``disc_factor`` is 0 before ``disc_start``.

References:
  Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", 2022, Sec. 3 and
  App. G (the ``LPIPSWithDiscriminator`` loss of ``ldm/modules/losses/contperceptual.py``); Esser et
  al., "Taming Transformers", 2021, eq. 7 (adaptive weight); Lim & Ye 2017 (hinge GAN loss);
  Kingma & Welling 2014, App. B (Gaussian KL).
"""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

# The adaptive weight's clip range (taming/LDM ``calculate_adaptive_weight``).
ADAPTIVE_WEIGHT_MAX = 1e4
ADAPTIVE_WEIGHT_EPS = 1e-4


def kl_to_standard_normal(mean: ArrayLike, logvar: ArrayLike) -> jax.Array:
    """``KL(N(mean, e^logvar) ‖ N(0, I))`` per example: ``½ Σ (μ² + σ² − 1 − log σ²)`` over all but
    the batch axis. Shapes (B, ...) -> (B,)."""
    mean, logvar = jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)
    terms = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return terms.reshape(terms.shape[0], -1).sum(axis=1)


def reconstruction_nll(
    x: ArrayLike,
    x_rec: ArrayLike,
    logvar: ArrayLike,
    *,
    perceptual: ArrayLike | None = None,
    perceptual_weight: float = 0.0,
) -> jax.Array:
    """``Σ_pixels (|x − x̂| + w_p · p) / e^{logvar} + logvar``, divided by the batch size.

    Args:
      x, x_rec: (B, H, W, C) images and reconstructions.
      logvar: the learned scalar log-variance.
      perceptual: (B,) or (B, 1, 1, 1) perceptual distances broadcast over pixels, or None.
      perceptual_weight: w_p.
    """
    x, x_rec = jnp.asarray(x, jnp.float32), jnp.asarray(x_rec, jnp.float32)
    rec = jnp.abs(x - x_rec)
    if perceptual is not None and perceptual_weight > 0:
        rec = rec + perceptual_weight * jnp.asarray(perceptual, jnp.float32).reshape(-1, 1, 1, 1)
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / x.shape[0]


def generator_loss(fake_logits: ArrayLike) -> jax.Array:
    """The generator's GAN term ``−mean D(x̂)``."""
    return -jnp.mean(jnp.asarray(fake_logits, jnp.float32))


def hinge_discriminator_loss(real_logits: ArrayLike, fake_logits: ArrayLike) -> jax.Array:
    """``½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))``."""
    real = jnp.asarray(real_logits, jnp.float32)
    fake = jnp.asarray(fake_logits, jnp.float32)
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def discriminator_factor(step: ArrayLike, *, disc_start: int, disc_factor: float = 1.0) -> jax.Array:
    """``disc_factor`` from step ``disc_start`` on, 0 before (taming's ``adopt_weight``)."""
    return jnp.where(jnp.asarray(step) < disc_start, 0.0, disc_factor).astype(jnp.float32)


def adaptive_weight(nll_grad: ArrayLike, gan_grad: ArrayLike, *, disc_weight: float) -> jax.Array:
    """``clip(‖∇_W nll‖ / (‖∇_W g_loss‖ + 1e-4), 0, 1e4) · disc_weight``, with no gradient.

    Args:
      nll_grad, gan_grad: gradients of the two losses with respect to the decoder's last layer.
      disc_weight: the configured discriminator weight.
    """
    ratio = jnp.linalg.norm(jnp.ravel(nll_grad)) / (
        jnp.linalg.norm(jnp.ravel(gan_grad)) + ADAPTIVE_WEIGHT_EPS
    )
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAX) * disc_weight)


__all__ = [
    "adaptive_weight",
    "discriminator_factor",
    "generator_loss",
    "hinge_discriminator_loss",
    "kl_to_standard_normal",
    "reconstruction_nll",
]
