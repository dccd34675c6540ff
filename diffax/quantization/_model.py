"""A quantized network: every ``nn.Conv`` / ``nn.Dense`` of a Flax model (U-Net, DiT) runs on quantized
weights and inputs, intercepted with ``flax.linen.intercept_methods`` so the model code is untouched.

A layer's input channels may be split into groups with their own quantizers: Q-Diffusion's shortcut
splitting (Li et al. 2023, Sec. 4.3) for the layers that read a U-Net skip concatenation,
``Q(W_1) Q(X_1) + Q(W_2) Q(X_2)``. A layer named in ``QuantSpec.float_inputs`` keeps its input in
float (weight-only quantization): by default the layer that reads the network's own input ``x_t``,
which PTQ4DM (Shang et al. 2023) and the BRECQ/QDrop code it builds on never quantize, their
activation quantizers sitting on layer outputs. A layer named in ``QuantSpec.eight_bit_weights`` has
8-bit weights whatever ``weight_bits`` is: by default the first and the last layer, the 8-bit "head
and stem" of BRECQ (Li et al. 2021), QDrop and PTQ4DM. Two executions of the same quantized state:

- ``"fake"``: dequantized weights and inputs in float32 (simulated quantization);
- ``"int8"``: int8 codes multiplied with int32 accumulation (``preferred_element_type``), the
  activation zero point folded into a per-channel correction, then one float rescale (a float input:
  the float input times the dequantized int8 weights).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.quantization import _quantizers as q

LAYER_TYPES = (nn.Conv, nn.Dense)


def layer_key(module: nn.Module) -> str:
    """The layer's path in the parameter tree, ``"up1_0_res/Conv_0"``."""
    return "/".join(module.path)


def _is_layer_call(context: Any) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, LAYER_TYPES)


def capture_inputs(apply_fn: Callable[..., jax.Array], *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
    """The input of every Conv/Dense layer during ``apply_fn(*args, **kwargs)`` (traceable)."""
    inputs: dict[str, jax.Array] = {}

    def record(next_fun, call_args, call_kwargs, context):
        if _is_layer_call(context):
            inputs[layer_key(context.module)] = call_args[0]
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        apply_fn(*args, **kwargs)
    return inputs


def layer_call_order(apply_fn: Callable[..., jax.Array], *args: Any, **kwargs: Any) -> tuple[str, ...]:
    """The Conv/Dense layers in the order ``apply_fn(*args, **kwargs)`` calls them (traced abstractly;
    a jitted ``capture_inputs`` returns its dict in sorted key order)."""
    order: list[str] = []

    def record(next_fun, call_args, call_kwargs, context):
        if _is_layer_call(context):
            order.append(layer_key(context.module))
        return next_fun(*call_args, **call_kwargs)

    def run():
        with nn.intercept_methods(record):
            return apply_fn(*args, **kwargs)

    jax.eval_shape(run)
    return tuple(dict.fromkeys(order))


def kernel_of(params: Mapping[str, Any], key: str) -> tuple[jax.Array, jax.Array | None]:
    """A layer's kernel and bias from the parameter tree."""
    node = params
    for name in key.split("/"):
        node = node[name]
    return node["kernel"], node.get("bias")


def unet_skip_splits(unet: Any) -> dict[str, int]:
    """For a ``diffax.models.UNet``: the layers that read ``concat([h, skip])`` and the channels of ``h``.

    In each up block ``up{level}_{i}_res`` the first convolution (after GroupNorm-SiLU, which keep
    the channel order) and the 1x1 shortcut read the concatenation; ``h`` has the level's channels,
    or at ``i = 0`` those of the level below it (the middle block's at the deepest level).
    """
    chans = tuple(unet.base_channels * m for m in unet.channel_mult)
    splits = {}
    for level, channels in enumerate(chans):
        for i in range(unet.num_res_blocks + 1):
            first = chans[min(level + 1, len(chans) - 1)] if i == 0 else channels
            splits[f"up{level}_{i}_res/Conv_0"] = first
            splits[f"up{level}_{i}_res/Conv_2"] = first
    return splits


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What is quantized and how (static: not part of the checkpointed state).

    Attributes:
      weight_bits: bits of the per-output-channel symmetric weight codes (4 or 8).
      act_bits: bits of the per-tensor asymmetric input codes (8).
      groups: per layer key, the input-channel boundaries ``(0, c_1, ..., C)`` of its quantizer groups.
      float_inputs: layer keys whose input is not quantized (weight-only quantization).
      eight_bit_weights: layer keys whose weights have 8 bits whatever ``weight_bits`` is.
    """

    weight_bits: int
    act_bits: int
    groups: Mapping[str, tuple[int, ...]]
    float_inputs: tuple[str, ...] = ()
    eight_bit_weights: tuple[str, ...] = ()

    def bits_of(self, key: str) -> int:
        """The weight bits of layer ``key``."""
        return 8 if key in self.eight_bit_weights else self.weight_bits


def _slices(bounds: tuple[int, ...]) -> list[slice]:
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _conv_geometry(module: nn.Conv, x: jax.Array, kernel: jax.Array) -> tuple[tuple[int, ...], list]:
    ndim = kernel.ndim - 2
    strides = module.strides or 1
    strides = (strides,) * ndim if isinstance(strides, int) else tuple(strides)
    padding = module.padding
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], kernel.shape[:-2], strides, padding)
    return strides, [tuple(p) for p in padding]


def _linear(module: nn.Module, x: jax.Array, kernel: jax.Array, *, precision: Any = None) -> jax.Array:
    """The layer's linear map (no bias) of ``x`` by ``kernel``; convolutions take pre-padded inputs."""
    out_type = jnp.int32 if x.dtype == jnp.int8 else None
    if isinstance(module, nn.Conv):
        strides, _ = _conv_geometry(module, x, kernel)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            strides,
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
            preferred_element_type=out_type,
        )
    return jax.lax.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision, preferred_element_type=out_type
    )


def _pad(module: nn.Module, x: jax.Array, kernel_shape: tuple[int, ...], value: Any) -> jax.Array:
    if not isinstance(module, nn.Conv):
        return x
    _, pads = _conv_geometry(module, x, jnp.zeros(kernel_shape))
    return jnp.pad(x, [(0, 0), *pads, (0, 0)], constant_values=value)


def quantized_layer(
    module: nn.Module,
    x: jax.Array,
    state: Mapping[str, jax.Array],
    spec: QuantSpec,
    key: str,
    mode: str,
    kernel: jax.Array | None = None,
) -> jax.Array:
    """One Conv/Dense layer on quantized weights and inputs (``mode`` ``"fake"`` or ``"int8"``).

    ``kernel`` (fake mode) replaces the dequantized codes, e.g. AdaRound's soft-rounded kernel.
    """
    codes, w_scale = state["codes"], state["w_scale"]
    float_input = key in spec.float_inputs
    out = 0.0
    for g, part in enumerate(_slices(spec.groups[key])):
        xg, cg = x[..., part], codes[..., part, :]
        if mode == "fake" or float_input:  # a float product; a float input is weight-only in int8 too
            xq = xg
            if not float_input:
                xq = q.fake_quant_activation(xg, state["a_scale"][g], state["a_zero"][g], spec.act_bits)
            if kernel is None:
                wq = cg.astype(jnp.float32) * q.channelwise(w_scale[g], cg.ndim)
            else:
                wq = kernel[..., part, :]
            xq = _pad(module, xq.astype(jnp.float32), cg.shape, 0.0)
            out = out + _linear(module, xq, wq, precision=jax.lax.Precision.HIGHEST)
        else:  # codes shifted to int8; the pad value is the zero point, whose product is subtracted
            a_scale, a_zero = state["a_scale"][g], state["a_zero"][g]
            shift = 2 ** (spec.act_bits - 1)
            xq = (q.activation_codes(xg, a_scale, a_zero, spec.act_bits) - shift).astype(jnp.int8)
            zero = (a_zero - shift).astype(jnp.int32)
            acc = _linear(module, _pad(module, xq, cg.shape, zero.astype(jnp.int8)), cg)
            correction = zero * jnp.sum(cg.astype(jnp.int32), axis=tuple(range(cg.ndim - 1)))
            rescale = q.channelwise(a_scale * w_scale[g], acc.ndim)
            out = out + (acc - q.channelwise(correction, acc.ndim)).astype(jnp.float32) * rescale
    if "bias" in state:
        out = out + q.channelwise(state["bias"], out.ndim)
    return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """A Flax model whose Conv/Dense layers run quantized; duck-types ``module.apply``.

    ``apply({"params": params}, x, t, cond, train=False)`` uses ``params`` for everything that is
    not quantized (normalisations, embeddings tables) and ``state`` for the quantized layers.

    Attributes:
      module: the full-precision Flax model.
      spec: bits and quantizer groups.
      state: per layer key ``{"codes": int8 kernel, "w_scale": (groups, cout), "a_scale": (groups,),
        "a_zero": (groups,), "bias": (cout,)}`` (a pytree: save it with Orbax).
      mode: ``"fake"`` or ``"int8"``.
    """

    module: nn.Module
    spec: QuantSpec
    state: Mapping[str, Mapping[str, jax.Array]]
    mode: str = "fake"

    def apply(self, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> jax.Array:
        with nn.intercept_methods(quantizing_interceptor(self.state, self.spec, self.mode)):
            return self.module.apply(variables, *args, **kwargs)


def quantizing_interceptor(
    state: Mapping[str, Mapping[str, jax.Array]],
    spec: QuantSpec,
    mode: str,
    *,
    prefix: tuple[str, ...] = (),
    kernels: Mapping[str, jax.Array] | None = None,
    outputs: dict[str, jax.Array] | None = None,
) -> Callable[..., Any]:
    """Runs the Conv/Dense layers keyed in ``state`` quantized (a sub-module applied on its own passes
    its path as ``prefix``); ``kernels`` replace their dequantized kernels, ``outputs`` collects their
    outputs."""

    def intercept(next_fun, call_args, call_kwargs, context):
        key = "/".join((*prefix, *context.module.path)) if _is_layer_call(context) else None
        if key not in state:
            return next_fun(*call_args, **call_kwargs)
        kernel = None if kernels is None else kernels.get(key)
        out = quantized_layer(context.module, call_args[0], state[key], spec, key, mode, kernel)
        if outputs is not None:
            outputs[key] = out
        return out

    return intercept


def network_input_layers(inputs: Mapping[str, jax.Array], x: jax.Array) -> tuple[str, ...]:
    """The layers whose captured input is the network input ``x`` (U-Net ``conv_in``, DiT ``patch``)."""
    x = np.asarray(x, np.float32)
    return tuple(
        key
        for key, value in inputs.items()
        if value.shape == x.shape and np.array_equal(np.asarray(value, np.float32), x)
    )


def layer_groups(inputs: Mapping[str, jax.Array], splits: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Each captured layer's quantizer groups: one, or two where ``splits`` names its concat boundary."""
    groups = {}
    for key, x in inputs.items():
        channels = int(x.shape[-1])
        split = splits.get(key)
        groups[key] = (0, split, channels) if split and 0 < split < channels else (0, channels)
    return groups


def weight_state(params: Mapping[str, Any], spec: QuantSpec) -> dict[str, dict[str, jax.Array]]:
    """Per-channel weight codes and steps of every layer (MSE-searched clipping per input group)."""
    state = {}
    for key, bounds in spec.groups.items():
        bits = spec.bits_of(key)
        kernel, bias = kernel_of(params, key)
        kernel = jnp.asarray(kernel, jnp.float32)
        scales = [q.search_weight_scale(kernel[..., part, :], bits) for part in _slices(bounds)]
        codes = jnp.concatenate(
            [
                q.weight_codes(kernel[..., part, :], s, bits)
                for part, s in zip(_slices(bounds), scales, strict=True)
            ],
            axis=-2,
        )
        state[key] = {"codes": codes, "w_scale": jnp.stack(scales)}
        if bias is not None:
            state[key]["bias"] = jnp.asarray(bias, jnp.float32)
    return state


def activation_ranges(
    capture: Callable[[jax.Array, jax.Array], dict[str, jax.Array]],
    batches: list[tuple[jax.Array, jax.Array]],
    groups: Mapping[str, tuple[int, ...]],
    bits: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer and group, the input range ``(lo, hi)`` minimising the summed quantization MSE.

    Two passes over the calibration batches: the min/max, then the error of each ``CLIP_GRID``
    shrink of it (the BRECQ/Q-Diffusion initialisation of activation steps by MSE search).

    Args:
      capture: ``capture(x, t) -> {layer key: input}`` (jitted).
      batches: calibration ``(x_t, t)`` pairs.
      groups: each layer's input-channel groups.
      bits: activation bits.
    """
    lo, hi = {}, {}
    for x, t in batches:
        for key, value in capture(x, t).items():
            for g, part in enumerate(_slices(groups.get(key, ()))):
                v = np.asarray(value[..., part])
                lo[key, g] = min(lo.get((key, g), np.inf), float(v.min()))
                hi[key, g] = max(hi.get((key, g), -np.inf), float(v.max()))
    errors: dict[tuple[str, int], np.ndarray] = {}
    measure = jax.jit(q.activation_errors, static_argnums=3)
    for x, t in batches:
        for key, value in capture(x, t).items():
            for g, part in enumerate(_slices(groups.get(key, ()))):
                e = np.asarray(measure(value[..., part], lo[key, g], hi[key, g], bits))
                errors[key, g] = errors.get((key, g), 0.0) + e
    ranges = {}
    for key, bounds in groups.items():
        best = [q.CLIP_GRID[int(np.argmin(errors[key, g]))] for g in range(len(bounds) - 1)]
        ranges[key] = (
            np.array([c * lo[key, g] for g, c in enumerate(best)], np.float32),
            np.array([c * hi[key, g] for g, c in enumerate(best)], np.float32),
        )
    return ranges


def with_activations(
    state: Mapping[str, Mapping[str, jax.Array]],
    ranges: Mapping[str, tuple[np.ndarray, np.ndarray]],
    bits: int,
) -> dict[str, dict[str, jax.Array]]:
    """``state`` with each ranged layer's activation steps and zero points (the others: float inputs)."""
    out = {}
    for key, layer in state.items():
        out[key] = dict(layer)
        if key in ranges:
            scale, zero = q.activation_params(*ranges[key], bits)
            out[key] |= {"a_scale": scale, "a_zero": zero}
    return out
