"""Training losses for diffusion models: per-example terms and the ``make_loss`` factory.

Per-example functions return one value per batch element (mean over data dimensions, or bits per
dimension for the variational bound). ``make_loss`` closes over a schedule and a network and returns
``loss_fn(params, batch, key) -> (scalar, aux)``.

References: Ho et al. 2020 (L_simple, VLB); Nichol & Dhariwal 2021 (hybrid loss, learned variance,
importance sampling); Salimans & Ho 2022 (v); Hang et al. 2023 (min-SNR-gamma); Karras et al. 2022
(EDM); Lipman et al. 2023 and Liu et al. 2023 (flow matching).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.immiscible import assign_noise
from diffax.parameterization import (
    check_prediction,
    edm_preconditioning,
    from_x0_eps,
    to_x0_eps,
    x0_error_scale,
)
from diffax.process import broadcast_to_data, q_posterior_discrete, q_sample
from diffax.schedules import EDM, DiscreteSchedule, Schedule

__all__ = [
    "LOSSES",
    "WEIGHTINGS",
    "mean_flat",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "sample_time",
    "importance_time_probs",
    "min_snr_weight",
    "simple_loss",
    "learned_log_variance",
    "vlb_term_bpd",
    "vlb_bpd",
    "edm_loss",
    "make_loss",
]

LOSSES = ("simple", "hybrid", "vlb", "edm", "flow_matching")
WEIGHTINGS = ("uniform", "min_snr")

# ApplyFn(params, x_t, t, cond, key) -> network output.
ApplyFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], jax.Array]


def mean_flat(x: ArrayLike) -> jax.Array:
    """Mean over every axis but the leading (batch) one."""
    x = jnp.asarray(x)
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def normal_kl(mean1: ArrayLike, logvar1: ArrayLike, mean2: ArrayLike, logvar2: ArrayLike) -> jax.Array:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: ArrayLike, *, mean: ArrayLike, log_scale: ArrayLike, num_bins: int = 256
) -> jax.Array:
    """Elementwise log-probability of data x in [-1, 1] on ``num_bins`` bins under N(mean, e^{2 log_scale}).

    The edge bins extend to -inf and +inf (Ho et al. 2020, eq. 13). The normal CDF uses DDPM's tanh
    approximation, so numbers match the published bits/dim code.

    References: Ho et al. 2020, eq. 13.
    """
    x, mean, log_scale = jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_scale)
    half_bin = 1.0 / (num_bins - 1)
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + half_bin))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - half_bin))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def sample_time(
    schedule: Schedule,
    key: jax.Array,
    batch_size: int,
    *,
    t_eps: float = 1e-5,
    probs: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Draws training times and their importance weights.

    Discrete schedules draw a grid index i uniformly (or from ``probs``) and return t = (i+1)/T;
    continuous ones draw t ~ U(max(t_min, t_eps), t_max).

    Returns:
      ``(t, weight)``, each of shape (batch,); weight = 1 / (T p_i) when ``probs`` is given, else 1, so
      that ``mean(weight * L_t)`` stays an unbiased estimate of the uniform-time loss.

    References: Nichol & Dhariwal 2021, Sec. 3.3 (importance sampling, eq. 18).
    """
    if isinstance(schedule, DiscreteSchedule):
        num = schedule.num_timesteps
        if probs is None:
            index = jax.random.randint(key, (batch_size,), 0, num)
            weight = jnp.ones((batch_size,))
        else:
            probs = jnp.asarray(probs)
            if probs.shape != (num,):
                raise ValueError(f"probs must have shape ({num},) = (num_timesteps,); got {probs.shape}.")
            index = jax.random.choice(key, num, (batch_size,), p=probs)
            weight = 1.0 / (num * probs[index])
        return schedule.t_from_index(index), weight
    if probs is not None:
        raise ValueError("probs (importance sampling) needs a discrete schedule; got a continuous one.")
    t = jax.random.uniform(key, (batch_size,), minval=max(schedule.t_min, t_eps), maxval=schedule.t_max)
    return t, jnp.ones((batch_size,))


def importance_time_probs(loss_sq_history: ArrayLike, *, uniform_mix: float = 1e-3) -> jax.Array:
    """Timestep probabilities p_t proportional to sqrt(E[L_t^2]) from a (T, history) array of squared
    per-timestep VLB terms, mixed with a little of the uniform distribution.

    References: Nichol & Dhariwal 2021, eq. 18 and Sec. 3.3.
    """
    history = jnp.asarray(loss_sq_history)
    if history.ndim != 2:
        raise ValueError(f"loss_sq_history must have shape (T, history); got {history.shape}.")
    weights = jnp.sqrt(jnp.mean(history, axis=-1))
    probs = weights / jnp.sum(weights)
    return (1.0 - uniform_mix) * probs + uniform_mix / history.shape[0]


def min_snr_weight(schedule: Schedule, t: ArrayLike, *, prediction: str, gamma: float = 5.0) -> jax.Array:
    """Min-SNR-gamma weight for a loss on ``prediction``: min(SNR, gamma) / c, where c turns the loss
    into an x_0 error (c = SNR for eps, 1 for x0, SNR + 1 for v on VP schedules).

    References: Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", eq. 7 and Sec. 3.4.
    """
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0; got {gamma}.")
    snr = jnp.exp(schedule.log_snr(t))
    return jnp.minimum(snr, gamma) / x0_error_scale(schedule, t, prediction=prediction)


def simple_loss(
    schedule: Schedule,
    model_output: ArrayLike,
    x0: ArrayLike,
    noise: ArrayLike,
    t: ArrayLike,
    *,
    prediction: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
) -> jax.Array:
    """Per-example weighted mean squared error between the network output and its target.

    The target is ``prediction`` evaluated at (x0, noise): eps gives DDPM's L_simple (Ho et al. 2020,
    eq. 14), v gives Salimans & Ho 2022's loss, "flow" with the rectified-flow schedule gives the
    flow-matching loss ||u - (eps - x0)||^2 (Lipman et al. 2023, eq. 23).

    Returns:
      shape (batch,).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; known weightings: {', '.join(WEIGHTINGS)}.")
    target = from_x0_eps(schedule, x0, noise, t, prediction=prediction)
    loss = mean_flat(jnp.square(jnp.asarray(model_output, jnp.float32) - target.astype(jnp.float32)))
    if weighting == "min_snr":
        loss = loss * min_snr_weight(schedule, t, prediction=prediction, gamma=min_snr_gamma)
    return loss


def learned_log_variance(
    schedule: DiscreteSchedule, variance_output: ArrayLike, index: ArrayLike
) -> jax.Array:
    """Improved DDPM's learned variance: log Sigma = v log beta_t + (1 - v) log beta~_t, v = (out + 1)/2.

    References: Nichol & Dhariwal 2021, eq. 15.
    """
    variance_output = jnp.asarray(variance_output)
    zeros = jnp.zeros_like(variance_output)
    _, _, log_var_small = q_posterior_discrete(schedule, zeros, zeros, index)
    log_var_large = broadcast_to_data(jnp.log(schedule.betas[jnp.asarray(index)]), variance_output)
    frac = (variance_output + 1.0) / 2.0
    return frac * log_var_large + (1.0 - frac) * log_var_small


def vlb_term_bpd(
    schedule: DiscreteSchedule,
    x0: ArrayLike,
    x_t: ArrayLike,
    index: ArrayLike,
    *,
    x0_pred: ArrayLike,
    log_variance: ArrayLike,
) -> jax.Array:
    """One term of the variational bound, in bits per dimension, per example.

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for grid index > 0, and the decoder term
    L_0 = -log p(x_0 | x_1) (discretized Gaussian) at index 0. The model's mean is the posterior mean
    at its x_0 prediction.

    Args:
      schedule: a discrete schedule.
      x0: data in [-1, 1].
      x_t: its noised version at grid index ``index`` (t = (index + 1) / T).
      index: integer grid indices, shape (batch,).
      x0_pred: the model's x_0 prediction.
      log_variance: the model's log-variance of p(x_{t-1} | x_t), broadcastable to x0.

    References: Ho et al. 2020, eq. 5 and 13; Nichol & Dhariwal 2021, eq. 4-5.
    """
    true_mean, _, true_log_var = q_posterior_discrete(schedule, x_t, x0, index)
    model_mean, _, _ = q_posterior_discrete(schedule, x_t, x0_pred, index)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, log_variance)) / math.log(2.0)
    log_scale = 0.5 * jnp.broadcast_to(log_variance, model_mean.shape)
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, mean=model_mean, log_scale=log_scale)
    ) / math.log(2.0)
    return jnp.where(jnp.asarray(index) == 0, decoder_nll, kl)


def _split_learned_variance(output: jax.Array, x_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    if output.shape[:-1] != x_shape[:-1] or output.shape[-1] != 2 * x_shape[-1]:
        raise ValueError(
            f"A learned-variance loss needs a network output with 2x the data channels, shape "
            f"{x_shape[:-1] + (2 * x_shape[-1],)}; got {output.shape}. Enable learned_variance in the model."
        )
    channels = x_shape[-1]
    return output[..., :channels], output[..., channels:]


def vlb_bpd(
    schedule: DiscreteSchedule,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: ArrayLike,
    key: jax.Array,
    *,
    prediction: str = "eps",
    learned_variance: bool = False,
    clip_denoised: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The full variational bound in bits per dimension: every one of the T terms plus the prior.

    ``model_fn(x_t, t) -> output`` is the network with its parameters bound. Each term draws its own
    x_t ~ q(x_t | x_0). The fixed-variance model uses the posterior variance (DDPM's sigma_t^2 = beta~_t).
    ``clip_denoised`` clips the x_0 prediction to [-1, 1], as DDPM's evaluation does.

    Returns:
      ``(total_bpd, {"terms": (T, batch), "prior": (batch,)})``.

    References: Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, App. (bits/dim evaluation).
    """
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError("vlb_bpd needs a discrete schedule (the bound sums its T steps).")
    x0 = jnp.asarray(x0)
    batch = x0.shape[0]

    def term(_, index_key):
        index, k = index_key
        indices = jnp.full((batch,), index)
        t = schedule.t_from_index(indices)
        x_t = q_sample(schedule, x0, t, jax.random.normal(k, x0.shape, x0.dtype))
        x0_pred, log_var = _model_mean_and_log_variance(
            schedule,
            model_fn(x_t, t),
            x_t,
            t,
            indices,
            prediction=prediction,
            learned_variance=learned_variance,
            clip_denoised=clip_denoised,
        )
        return None, vlb_term_bpd(schedule, x0, x_t, indices, x0_pred=x0_pred, log_variance=log_var)

    num = schedule.num_timesteps
    _, terms = jax.lax.scan(term, None, (jnp.arange(num), jax.random.split(key, num)))
    t_last = jnp.full((batch,), schedule.t_max)
    mean_t = broadcast_to_data(schedule.alpha(t_last), x0) * x0
    log_var_t = broadcast_to_data(2.0 * schedule.log_sigma(t_last), x0)
    prior = mean_flat(normal_kl(mean_t, log_var_t, 0.0, 0.0)) / math.log(2.0)
    return jnp.sum(terms, axis=0) + prior, {"terms": terms, "prior": prior}


def _model_mean_and_log_variance(
    schedule: DiscreteSchedule,
    output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    index: jax.Array,
    *,
    prediction: str,
    learned_variance: bool,
    clip_denoised: bool,
) -> tuple[jax.Array, jax.Array]:
    """(x0 prediction, optionally clipped to [-1, 1]; log-variance) of p(x_{t-1} | x_t)."""
    if learned_variance:
        output, variance_output = _split_learned_variance(output, x_t.shape)
        log_var = learned_log_variance(schedule, variance_output, index)
    else:
        _, _, log_var = q_posterior_discrete(schedule, x_t, x_t, index)
    x0_pred, _ = to_x0_eps(schedule, output, x_t, t, prediction=prediction)
    return (jnp.clip(x0_pred, -1.0, 1.0) if clip_denoised else x0_pred), log_var


def edm_loss(denoised: ArrayLike, x0: ArrayLike, sigma: ArrayLike, *, sigma_data: float = 0.5) -> jax.Array:
    """EDM's per-example loss lambda(sigma) ||D(x0 + n; sigma) - x0||^2 (mean over dimensions),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    For data of variance sigma_data^2 and the exact denoiser its expectation is exactly 1.

    References: Karras et al. 2022, eq. 8 and Table 1 (training).
    """
    sigma = jnp.asarray(sigma)
    weight = (jnp.square(sigma) + sigma_data**2) / jnp.square(sigma * sigma_data)
    return weight * mean_flat(jnp.square(jnp.asarray(denoised) - jnp.asarray(x0)))


def _check_choice(field: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(f"Unknown {field} {value!r}; known: {', '.join(known)}.")


def make_loss(
    schedule: Schedule,
    apply_fn: ApplyFn,
    *,
    loss: str = "simple",
    prediction: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    vlb_weight: float = 1e-3,
    learned_variance: bool = False,
    t_eps: float = 1e-5,
    edm_p_mean: float = -1.2,
    edm_p_std: float = 1.2,
    immiscible: bool = False,
) -> Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """Builds ``loss_fn(params, batch, key) -> (loss, aux)`` for one of ``LOSSES``.

    ``batch`` holds ``"image"`` (data in [-1, 1], shape (B, ...)), optionally ``"label"`` (passed to the
    network as ``cond``) and ``"time_probs"`` (importance-sampling probabilities over a discrete grid).
    ``apply_fn(params, x_t, t, cond, key)`` is the network; ``key`` feeds its dropout.

    Losses:
      - ``"simple"``: MSE on the ``prediction`` target, weighted by ``weighting`` (Ho et al. 2020, eq. 14;
        Hang et al. 2023 for ``"min_snr"``).
      - ``"hybrid"``: simple + ``vlb_weight`` * L_vlb with a stop-gradient on the mean for the VLB term;
        needs a discrete schedule and a learned-variance head (Nichol & Dhariwal 2021, eq. 16).
      - ``"vlb"``: the bound alone (T L_{t} per example, bits/dim).
      - ``"edm"``: log-normal sigma, EDM preconditioning and weighting; needs the ``EDM`` schedule, and the
        network receives c_in x and c_noise (Karras et al. 2022, Table 1).
      - ``"flow_matching"``: velocity regression on the ``"flow"`` target (Lipman et al. 2023, eq. 23).

    ``immiscible=True`` noises each image with the batch's Gaussian draw that a minimum-distance
    linear assignment gives it (Li et al. 2024, Alg. 1; ``diffax.immiscible.assign_noise``).

    Returns:
      the loss function; ``aux`` holds the per-example losses, times and (hybrid/vlb) VLB terms.
    """
    _check_choice("loss", loss, LOSSES)
    _check_choice("weighting", weighting, WEIGHTINGS)
    check_prediction(prediction)
    if loss == "flow_matching":
        prediction = "flow"
    if loss in ("hybrid", "vlb") and not isinstance(schedule, DiscreteSchedule):
        raise ValueError(f"loss={loss!r} needs a discrete schedule (linear, cosine, ...); got {schedule!r}.")
    if loss == "hybrid" and not learned_variance:
        raise ValueError("loss='hybrid' trains a learned variance: set learned_variance=True.")
    if loss == "edm" and not isinstance(schedule, EDM):
        raise ValueError("loss='edm' needs the 'edm' schedule (sigma(t) = t).")

    def loss_fn(params, batch, key):
        x0 = jnp.asarray(batch["image"])
        cond = batch.get("label")
        time_key, noise_key, model_key = jax.random.split(key, 3)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        if immiscible:
            noise = assign_noise(x0, noise)
        batch_size = x0.shape[0]

        if loss == "edm":
            sigma = jnp.exp(edm_p_mean + edm_p_std * jax.random.normal(time_key, (batch_size,)))
            c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data=schedule.sigma_data)
            x_t = x0 + broadcast_to_data(sigma, x0) * noise
            raw = apply_fn(params, broadcast_to_data(c_in, x0) * x_t, c_noise, cond, model_key)
            denoised = broadcast_to_data(c_skip, x0) * x_t + broadcast_to_data(c_out, x0) * raw
            per_example = edm_loss(denoised, x0, sigma, sigma_data=schedule.sigma_data)
            return jnp.mean(per_example), {"loss_per_example": per_example, "t": sigma}

        t, weight = sample_time(schedule, time_key, batch_size, t_eps=t_eps, probs=batch.get("time_probs"))
        x_t = q_sample(schedule, x0, t, noise)
        output = apply_fn(params, x_t, t, cond, model_key)
        if learned_variance:
            mean_output, variance_output = _split_learned_variance(output, x0.shape)
        else:
            mean_output = output
        aux = {"t": t}
        per_example = jnp.zeros((batch_size,))
        if loss != "vlb":
            per_example = simple_loss(
                schedule,
                mean_output,
                x0,
                noise,
                t,
                prediction=prediction,
                weighting=weighting,
                min_snr_gamma=min_snr_gamma,
            )
            aux["mse"] = per_example
        if loss in ("hybrid", "vlb"):
            index = jnp.round(schedule.index_from_t(t)).astype(jnp.int32)
            vlb_output = jax.lax.stop_gradient(mean_output) if loss == "hybrid" else mean_output
            if learned_variance:
                vlb_output = jnp.concatenate([vlb_output, variance_output], axis=-1)
            x0_pred, log_var = _model_mean_and_log_variance(
                schedule,
                vlb_output,
                x_t,
                t,
                index,
                prediction=prediction,
                learned_variance=learned_variance,
                clip_denoised=False,
            )
            vlb = vlb_term_bpd(schedule, x0, x_t, index, x0_pred=x0_pred, log_variance=log_var)
            aux["vlb_term"] = vlb
            scale = vlb_weight if loss == "hybrid" else 1.0
            per_example = per_example + scale * schedule.num_timesteps * vlb
        per_example = weight * per_example
        aux["loss_per_example"] = per_example
        return jnp.mean(per_example), aux

    return loss_fn
