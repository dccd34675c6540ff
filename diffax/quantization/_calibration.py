"""Calibration of a quantized diffusion network on the full-precision sampler's own trajectories.

The calibration set is drawn from the network inputs ``(x_t, t)`` that the full-precision sampler
produces from noise (never from noised training data), subsampled over its steps by method:

- ``"single"``: every sample from one step (the middle one): the single-timestep control;
- ``"uniform"``: the same number of samples from every step (Q-Diffusion, Li et al. 2023, Sec. 4.2);
- ``"normal"``: steps drawn from a normal over the generation order, mean 0.5 and std 0.35 of the
  number of steps (PTQ4DM's normally distributed time-step calibration, Shang et al. 2023, Sec. 4.3);
- ``"tfmq"``: ``"uniform"`` for every layer but the temporal ones (the time embedding and the
  layers that read it), which are calibrated on the finite set of the sampler's times alone and
  whose weight steps minimise the error of their own output (TFMQ-DM's time-feature maintenance,
  Huang et al. 2024, Sec. 4);
- ``"eda"``: EDA-DM (Liu et al. 2024): each step's share by the density and diversity of the
  middle-attention input across steps (TDAC, ``_reconstruction.tdac_step_counts``), and the blocks
  reconstructed with their inner layers' errors added (FBR) when ``reconstruction_iters`` > 0.

Any method can end with BRECQ block reconstruction of the weight rounding (AdaRound):
``reconstruction_iters`` Adam steps per block (``_reconstruction.reconstruct``).

Weights are quantized per output channel, inputs per tensor (per group where a layer reads a U-Net
skip concatenation, Q-Diffusion's shortcut splitting), steps found by MSE search. By default, as in
BRECQ, QDrop and PTQ4DM's code: the layer that reads the network's input ``x_t`` keeps that input in
float (``float_inputs``; their activation quantizers sit on layer outputs, so the input image is never
quantized), and the first and last layers keep 8-bit weights (``eight_bit_weights``, their 8-bit "head
and stem"). One per-tensor 8-bit range for ``x_t`` over all steps is as wide as the noisiest ``x_t``,
and at the least noisy steps an input error ``δ`` reads as an ε error of up to ``δ / σ_t``.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from diffax.quantization import _model, _quantizers, _reconstruction

CALIBRATIONS = ("single", "uniform", "normal", "tfmq", "eda")


def record_trajectories(sample_with: Callable[[Any], Any], module: Any) -> tuple[np.ndarray, np.ndarray]:
    """The network inputs of one sampling run: ``(x (K, N, ...), t (K, N))`` for its ``K`` evaluations.

    Args:
      sample_with: ``sample_with(module_like) -> samples``: runs the sampler with a network whose
        ``apply`` is the given object's (e.g. ``generate.make_sampler`` on parts with that module).
      module: the full-precision model.
    """
    xs, ts = [], []

    def sink(x, t):
        xs.append(np.asarray(x))
        ts.append(np.broadcast_to(np.asarray(t), (np.asarray(x).shape[0],)).copy())

    @dataclasses.dataclass(frozen=True)
    class Recorder:
        def apply(self, variables, x, t, *args, **kwargs):
            jax.experimental.io_callback(sink, None, x, t, ordered=True)
            return module.apply(variables, x, t, *args, **kwargs)

    jax.block_until_ready(sample_with(Recorder()))
    return np.stack(xs), np.stack(ts)


def calibration_set(
    xs: np.ndarray,
    ts: np.ndarray,
    *,
    method: str,
    num_samples: int,
    seed: int = 0,
    step_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``num_samples`` network inputs picked from trajectories ``(K, N, ...)`` by ``method`` (``"eda"``:
    ``step_counts`` per step, from ``_reconstruction.tdac_step_counts``)."""
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration method {method!r}: use one of {CALIBRATIONS}.")
    steps, n = ts.shape
    rng = np.random.default_rng(seed)
    if method == "eda":
        if step_counts is None or int(np.sum(step_counts)) != num_samples:
            raise ValueError("calibration method 'eda' needs step_counts summing to num_samples.")
        step = np.repeat(np.arange(steps), step_counts)
    elif method == "single":
        step = np.full(num_samples, steps // 2)
    elif method == "normal":
        step = np.clip(np.round(rng.normal(0.5 * steps, 0.35 * steps, num_samples)), 0, steps - 1).astype(int)
    else:
        step = np.arange(num_samples) % steps
    index = np.empty(num_samples, int)
    for k in np.unique(step):  # distinct trajectories within a step while there are enough
        where = np.flatnonzero(step == k)
        index[where] = rng.permutation(np.resize(np.arange(n), max(len(where), n)))[: len(where)]
    return xs[step, index], ts[step, index]


def is_temporal(key: str) -> bool:
    """Layers of the time embedding and those that read it (U-Net ``Dense`` projections, DiT adaLN)."""
    last = key.split("/")[-1]
    return key.startswith("time_embed") or last.startswith("Dense_") or last in ("adaln", "final_adaln")


def _reconstruction_weight_scale(kernel: jax.Array, inputs: jax.Array, bits: int) -> jax.Array:
    """Per-channel step minimising the layer's output error ``||x (W_q - W)||²`` over ``inputs``."""
    x = inputs.reshape(-1, inputs.shape[-1])
    scales, errors = [], []
    for c in _quantizers.CLIP_GRID:
        s = _quantizers.weight_scale(kernel, bits, clip=c)
        delta = _quantizers.fake_quant_weight(kernel, s, bits) - kernel
        scales.append(s)
        errors.append(jnp.sum(jnp.square(x @ delta), axis=0))
    best = jnp.argmin(jnp.stack(errors), axis=0)
    return jnp.take_along_axis(jnp.stack(scales), best[None], axis=0)[0]


def calibrate(
    module: Any,
    params: Any,
    trajectories: tuple[np.ndarray, np.ndarray],
    *,
    method: str,
    weight_bits: int,
    act_bits: int = 8,
    num_samples: int = 256,
    batch_size: int = 64,
    splits: Mapping[str, int] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    reconstruction_iters: int = 0,
    feature_block: str = "mid_attn",
    float_inputs: Sequence[str] | None = None,
    eight_bit_weights: Sequence[str] | None = None,
    seed: int = 0,
) -> _model.QuantizedModel:
    """Quantizes ``module``'s Conv/Dense layers, calibrated on the full-precision trajectories.

    Args:
      module: the Flax model (``diffax.models`` U-Net or DiT).
      params: its parameters.
      trajectories: ``record_trajectories``'s ``(xs, ts)``.
      method: one of ``CALIBRATIONS``.
      weight_bits: 4 or 8.
      act_bits: bits of the layer inputs.
      num_samples: calibration inputs.
      batch_size: calibration inputs per network call.
      splits: layer key -> channels of the first operand of a concatenated input (shortcut
        splitting; ``_model.unet_skip_splits`` for a U-Net).
      apply_kwargs: further arguments of ``module.apply`` (e.g. ``cond``, ``train=False``).
      reconstruction_iters: Adam steps of block reconstruction per block (0: none).
      feature_block: the top-level sub-module whose input is EDA-DM's feature (``"eda"``).
      float_inputs: layer keys whose input stays in float (weight-only); None: the layers that read
        the network input ``x_t`` (``_model.network_input_layers``); ``()``: every input quantized.
      eight_bit_weights: layer keys whose weights have 8 bits; None: the first and the last layer
        (those that read ``x_t`` and the last one called); ``()``: all have ``weight_bits``.
      seed: picks the calibration inputs and minibatches.

    Returns:
      the quantized model (``mode="fake"``; ``dataclasses.replace(m, mode="int8")`` executes in int8).
    """
    if weight_bits not in (4, 8) or act_bits not in (4, 8):
        raise ValueError(f"weight_bits={weight_bits}, act_bits={act_bits}: use 4 or 8 bits.")
    kwargs = dict(apply_kwargs or {"train": False})
    xs, ts = trajectories
    counts = None
    if method == "eda":
        run, _ = _reconstruction.block_calls(module, params, {feature_block}, kwargs)
        features = [run(x, t) for x, t in zip(xs, ts, strict=True)]
        if feature_block not in features[0]:
            raise ValueError(f"feature_block={feature_block!r}: no top-level sub-module of that name.")
        counts = _reconstruction.tdac_step_counts(
            np.stack([np.asarray(f[feature_block][0][0]) for f in features]), num_samples
        )
    x_cal, t_cal = calibration_set(
        xs,
        ts,
        method="uniform" if method == "tfmq" else method,
        num_samples=num_samples,
        seed=seed,
        step_counts=counts,
    )
    batches = [
        (x_cal[i : i + batch_size], t_cal[i : i + batch_size]) for i in range(0, num_samples, batch_size)
    ]
    capture = jax.jit(lambda x, t: _model.capture_inputs(module.apply, {"params": params}, x, t, **kwargs))
    inputs = capture(*batches[0])
    groups = _model.layer_groups(inputs, splits or {})
    first = _model.network_input_layers(inputs, batches[0][0])
    float_inputs = _layer_keys("float_inputs", first if float_inputs is None else float_inputs, groups)
    if eight_bit_weights is None:
        last = _model.layer_call_order(module.apply, {"params": params}, *batches[0], **kwargs)[-1]
        eight_bit_weights = (*first, last)
    eight_bit_weights = _layer_keys("eight_bit_weights", eight_bit_weights, groups)
    spec = _model.QuantSpec(weight_bits, act_bits, groups, float_inputs, eight_bit_weights)
    state = _model.weight_state(params, spec)
    quantized_inputs = {k: g for k, g in groups.items() if k not in float_inputs}
    ranges = _model.activation_ranges(capture, batches, quantized_inputs, act_bits)
    if method == "tfmq":  # temporal layers: the sampler's finite set of times, their own reconstruction
        temporal = {k: g for k, g in quantized_inputs.items() if is_temporal(k)}
        time_batch = [(xs[:, 0], ts[:, 0])]  # one input per sampler time
        ranges |= _model.activation_ranges(capture, time_batch, temporal, act_bits)
        inputs = capture(*time_batch[0])
        for key in temporal:
            kernel = jnp.asarray(_model.kernel_of(params, key)[0], jnp.float32)
            scale = _reconstruction_weight_scale(kernel, inputs[key], spec.bits_of(key))
            state[key] = state[key] | {
                "codes": _quantizers.weight_codes(kernel, scale, spec.bits_of(key)),
                "w_scale": scale[None],
            }
    model = _model.QuantizedModel(module, spec, _model.with_activations(state, ranges, act_bits))
    if reconstruction_iters > 0:
        model = _reconstruction.reconstruct(
            model,
            params,
            batches,
            iters=reconstruction_iters,
            batch_size=min(batch_size, 32),
            fine_grained=1.0 if method == "eda" else 0.0,
            apply_kwargs=kwargs,
            seed=seed,
        )
    return model


def _layer_keys(field: str, keys: Sequence[str], groups: Mapping[str, Any]) -> tuple[str, ...]:
    """``keys`` as a tuple, each a quantized layer, or a one-line error naming ``field``."""
    unknown = sorted(set(keys) - set(groups))
    if unknown:
        raise ValueError(
            f"{field}={unknown}: not Conv/Dense layers of the model; use keys such as {list(groups)[:3]}."
        )
    return tuple(dict.fromkeys(keys))


def per_step_mse(
    reference: Callable[[jax.Array, jax.Array], jax.Array],
    quantized: Callable[[jax.Array, jax.Array], jax.Array],
    xs: np.ndarray,
    ts: np.ndarray,
) -> np.ndarray:
    """Mean squared difference of two networks' outputs at each step of trajectories ``(K, N, ...)``."""
    return np.array(
        [float(jnp.mean(jnp.square(quantized(x, t) - reference(x, t)))) for x, t in zip(xs, ts, strict=True)]
    )


def save(path: str, model: _model.QuantizedModel) -> None:
    """Writes the quantized state (Orbax) and its spec (``spec.json``) into directory ``path``."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(path, "state"), dict(model.state))
    spec = dataclasses.asdict(model.spec)
    with open(os.path.join(path, "spec.json"), "w") as f:
        json.dump(spec | {"groups": {k: list(v) for k, v in spec["groups"].items()}}, f, indent=1)


def load(path: str, module: Any, *, mode: str = "fake") -> _model.QuantizedModel:
    """The quantized model that :func:`save` wrote, around the full-precision ``module``."""
    path = os.path.abspath(path)
    with open(os.path.join(path, "spec.json")) as f:
        spec = json.load(f)
    spec = _model.QuantSpec(
        weight_bits=spec["weight_bits"],
        act_bits=spec["act_bits"],
        groups={k: tuple(v) for k, v in spec["groups"].items()},
        float_inputs=tuple(spec.get("float_inputs", ())),
        eight_bit_weights=tuple(spec.get("eight_bit_weights", ())),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(path, "state"))
    return _model.QuantizedModel(module, spec, state, mode=mode)
