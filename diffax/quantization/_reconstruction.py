"""Block reconstruction of a quantized network with learned rounding, and EDA-DM's calibration set.

- AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"): each
  weight rounds to ``s (floor(w / s) + h(V))`` with the rectified sigmoid
  ``h(V) = clip(sigmoid(V) (ζ - γ) + γ, 0, 1)``, ζ = 1.1, γ = -0.1 (Eq. 23); ``V`` minimises the
  reconstruction error plus ``λ Σ 1 - |2 h(V) - 1|^β`` (Eq. 24) with β annealed from 20 to 2 after a
  warm-up without it, then rounds up where ``V >= 0``. ``V`` starts where ``h(V)`` is the fractional
  part, i.e. at nearest rounding.
- BRECQ (Li et al. 2021, Sec. 3-4): the error minimised is that of a whole block (a top-level
  sub-module: a U-Net residual or attention block, a DiT block), ``E ||f̂(x) - f(x)||²`` over the
  calibration inputs, all rounding variables of the block jointly, block after block.
- EDA-DM (Liu et al. 2024, "Enhanced Distribution Alignment for Post-Training Quantization of Diffusion
  Models"): fine-grained block reconstruction (FBR, Sec. 4.2) adds the errors of the block's inner layer
  outputs (all but the last) to the block error; temporal distribution alignment calibration (TDAC,
  Sec. 4.1) gives each sampler step a share of the calibration set by the density and diversity of
  a deep feature (the input of the U-Net's middle attention) across steps.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffax.quantization import _model

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid (Eq. 23)


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    """``h(V) = clip(sigmoid(V) (ζ - γ) + γ, 0, 1)`` (AdaRound Eq. 23)."""
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_init(kernel: jax.Array, scale: jax.Array) -> jax.Array:
    """``V`` with ``h(V) = w / s - floor(w / s)``: the soft kernel starts at the float kernel."""
    rest = kernel / scale - jnp.floor(kernel / scale)
    return -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def rounded_kernel(kernel: jax.Array, scale: jax.Array, v: jax.Array, bits: int, *, hard: bool) -> jax.Array:
    """``s clip(floor(w / s) + h(V))``, with ``h`` the rectified sigmoid or (``hard``) ``V >= 0``."""
    top = 2 ** (bits - 1) - 1
    up = (v >= 0).astype(jnp.float32) if hard else rectified_sigmoid(v)
    return jnp.clip(jnp.floor(kernel / scale) + up, -top, top) * scale


def rounding_regulariser(v: jax.Array, beta: jax.Array) -> jax.Array:
    """``Σ 1 - |2 h(V) - 1|^β`` (AdaRound Eq. 24): zero once every ``h`` is 0 or 1."""
    return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def output_error(quantized: jax.Array, reference: jax.Array) -> jax.Array:
    """``E ||f̂ - f||²``: squared error summed over channels (last axis), averaged over the batch and
    positions (BRECQ's and AdaRound's reconstruction loss)."""
    return jnp.mean(jnp.sum(jnp.square(quantized - reference), axis=-1))


def learn_rounding(
    reconstruction_error: Callable[[Mapping[str, jax.Array], Any], jax.Array],
    kernels: Mapping[str, jax.Array],
    scales: Mapping[str, jax.Array],
    bits: int | Mapping[str, int],
    data: Any,
    *,
    iters: int,
    batch_size: int,
    lr: float = 1e-2,
    reg_weight: float = 0.01,
    warmup: float = 0.2,
    beta_range: tuple[float, float] = (20.0, 2.0),
    seed: int = 0,
) -> dict[str, jax.Array]:
    """AdaRound: the rounding (up or down per weight) of each kernel, learned jointly.

    Args:
      reconstruction_error: ``(soft kernels by name, batch of data) -> error`` to minimise.
      kernels: float kernels by name.
      scales: their quantization steps, broadcastable to the kernels.
      bits: weight bits (symmetric codes in ``±(2^(b-1) - 1)``), or per kernel name.
      data: a pytree of arrays with a leading sample axis, minibatched.
      iters: Adam steps.
      batch_size: samples per step.
      lr: Adam's learning rate on ``V``.
      reg_weight: λ of the rounding regulariser.
      warmup: fraction of the steps without the regulariser (β then decays linearly).
      beta_range: β at the end of the warm-up and at the last step.
      seed: picks the minibatches.

    Returns:
      the hard-rounded kernels ``s clip(floor(w / s) + [V >= 0])``, or the nearest-rounded ones where
      those reconstruct ``data`` better.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    bits = bits if isinstance(bits, Mapping) else dict.fromkeys(kernels, bits)
    v = {k: rounding_init(w, scales[k]) for k, w in kernels.items()}
    v0 = v  # V at nearest rounding
    optimizer = optax.adam(lr)
    rng = np.random.default_rng(seed)

    def objective(v, batch, beta, regularise):
        soft = {k: rounded_kernel(w, scales[k], v[k], bits[k], hard=False) for k, w in kernels.items()}
        reg = sum(rounding_regulariser(v[k], beta) for k in v)
        return reconstruction_error(soft, batch) + regularise * reg_weight * reg

    @jax.jit
    def step(v, opt_state, batch, beta, regularise):
        grads = jax.grad(objective)(v, batch, beta, regularise)
        updates, opt_state = optimizer.update(grads, opt_state, v)
        return optax.apply_updates(v, updates), opt_state

    opt_state = optimizer.init(v)
    start = int(warmup * iters)
    for i in range(iters):
        index = rng.choice(n, size=min(batch_size, n), replace=False)
        batch = jax.tree.map(lambda a: a[index], data)
        progress = max(0.0, (i - start) / max(iters - start, 1))
        beta = beta_range[0] + (beta_range[1] - beta_range[0]) * progress
        v, opt_state = step(v, opt_state, batch, jnp.float32(beta), jnp.float32(i >= start))
    learned = {k: rounded_kernel(w, scales[k], v[k], bits[k], hard=True) for k, w in kernels.items()}
    nearest = {k: rounded_kernel(w, scales[k], v0[k], bits[k], hard=True) for k, w in kernels.items()}
    # the relaxation can settle where hardening loses (Adam drifts into h's flat ends near the float
    # optimum): kept only where it does not lose to nearest rounding on all the data
    check = jax.jit(reconstruction_error)
    return learned if float(check(learned, data)) <= float(check(nearest, data)) else nearest


@dataclasses.dataclass(frozen=True)
class _BlockCall:
    """One call of a top-level sub-module: the unbound module, and its arguments minus the arrays."""

    module: nn.Module
    tree: Any
    static: tuple[Any, ...]  # the non-array leaves, None where an array goes

    def arguments(self, arrays: Sequence[jax.Array]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        it = iter(arrays)
        return self.tree.unflatten([next(it) if s is None else s for s in self.static])


def block_calls(
    module: nn.Module, params: Any, names: set[str], apply_kwargs: Mapping[str, Any]
) -> tuple[Callable[..., dict[str, tuple[list[jax.Array], jax.Array]]], dict[str, _BlockCall]]:
    """A jitted ``(x, t) -> {name: (array arguments, output)}`` of the named top-level sub-modules
    during a full-precision forward pass, and (filled by its first call) how to call each on its own."""
    calls: dict[str, _BlockCall] = {}

    def run(x, t):
        found = {}

        def record(next_fun, call_args, call_kwargs, context):
            out = next_fun(*call_args, **call_kwargs)
            bound = context.method_name == "__call__" and context.module.scope is not None
            path = context.module.path if bound else ()
            if len(path) == 1 and path[0] in names:
                leaves, tree = jax.tree.flatten((call_args, call_kwargs))
                arrays = [leaf for leaf in leaves if isinstance(leaf, jax.Array)]
                static = tuple(None if isinstance(leaf, jax.Array) else leaf for leaf in leaves)
                calls[path[0]] = _BlockCall(context.module.clone(parent=None), tree, static)
                found[path[0]] = (arrays, out)
            return out

        with nn.intercept_methods(record):
            module.apply({"params": params}, x, t, **apply_kwargs)
        return found

    return jax.jit(run), calls


def _layer_outputs(apply: Callable[[], jax.Array], prefix: tuple[str, ...]) -> dict[str, jax.Array]:
    """The output of every Conv/Dense layer during ``apply()``, keyed ``prefix + path``."""
    outputs = {}

    def record(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name == "__call__" and isinstance(context.module, _model.LAYER_TYPES):
            outputs["/".join((*prefix, *context.module.path))] = out
        return out

    with nn.intercept_methods(record):
        apply()
    return outputs


def _element_scales(layer: Mapping[str, jax.Array], bounds: tuple[int, ...], shape: tuple[int, ...]):
    """Each kernel element's step: the per-output-channel step of its input-channel group."""
    return jnp.concatenate(
        [
            jnp.broadcast_to(layer["w_scale"][g], (*shape[:-2], b - a, shape[-1]))
            for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ],
        axis=-2,
    )


def reconstruct(
    model: _model.QuantizedModel,
    params: Any,
    batches: Sequence[tuple[jax.Array, jax.Array]],
    *,
    iters: int = 200,
    batch_size: int = 32,
    fine_grained: float = 0.0,
    reg_weight: float = 0.01,
    apply_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> _model.QuantizedModel:
    """BRECQ block reconstruction: every top-level sub-module's weight rounding learned (AdaRound) to
    reproduce its full-precision output on the calibration inputs, with the calibrated activation
    quantizers in place; ``fine_grained`` > 0 adds EDA-DM's inner-layer errors with that weight (FBR).

    Each block sees its full-precision inputs (recorded once); weight steps stay as calibrated.

    Args:
      model: a calibrated quantized model (``calibrate``).
      params: the full-precision parameters.
      batches: calibration ``(x_t, t)`` batches.
      iters: Adam steps per block.
      batch_size: calibration inputs per step.
      fine_grained: weight of the inner-layer output errors (0: BRECQ's block error alone).
      reg_weight: λ of AdaRound's rounding regulariser.
      apply_kwargs: further arguments of ``module.apply``.
      seed: picks the minibatches.

    Returns:
      the model with the learned weight codes.
    """
    kwargs = dict(apply_kwargs or {"train": False})
    names = list(dict.fromkeys(key.split("/")[0] for key in model.state))
    run, calls = block_calls(model.module, params, set(names), kwargs)
    recorded = [run(jnp.asarray(x), jnp.asarray(t)) for x, t in batches]
    state = dict(model.state)
    for name in names:
        call = calls[name]
        data = (
            [jnp.concatenate([r[name][0][i] for r in recorded]) for i in range(len(recorded[0][name][0]))],
            jnp.concatenate([r[name][1] for r in recorded]),
        )
        keys = [k for k in state if k.split("/")[0] == name]
        kernels = {k: jnp.asarray(_model.kernel_of(params, k)[0], jnp.float32) for k in keys}
        scales = {k: _element_scales(state[k], model.spec.groups[k], kernels[k].shape) for k in keys}
        block_params = params[name]

        def error(soft, batch, call=call, block_params=block_params, name=name):
            arrays, target = batch
            args, kw = call.arguments(arrays)
            outputs = {}
            intercept = _model.quantizing_interceptor(
                state, model.spec, "fake", prefix=(name,), kernels=soft, outputs=outputs
            )
            with nn.intercept_methods(intercept):
                out = call.module.apply({"params": block_params}, *args, **kw)
            total = output_error(out, target)
            if fine_grained:
                reference = _layer_outputs(
                    lambda: call.module.apply({"params": block_params}, *args, **kw), (name,)
                )
                inner = list(outputs)[:-1]
                total += fine_grained * sum(output_error(outputs[k], reference[k]) for k in inner)
            return total

        learned = learn_rounding(
            error,
            kernels,
            scales,
            {k: model.spec.bits_of(k) for k in keys},
            data,
            iters=iters,
            batch_size=batch_size,
            reg_weight=reg_weight,
            seed=seed,
        )
        for k in keys:
            top = 2 ** (model.spec.bits_of(k) - 1) - 1
            codes = jnp.clip(jnp.round(learned[k] / scales[k]), -top, top).astype(jnp.int8)
            state[k] = dict(state[k]) | {"codes": codes}
    return dataclasses.replace(model, state=state)


def tdac_step_counts(
    features: np.ndarray, num_samples: int, *, lam: float = 1.0, radius: float | None = None
) -> np.ndarray:
    """EDA-DM's TDAC: calibration samples per sampler step from a feature's density and diversity.

    With ``F_k`` the feature of the step-``k`` batch (channels last): density ``D_k`` counts the other
    steps within mean squared distance ``radius`` of it; diversity ``V_k = Σ_{j≠k} Σ (1 - cos(F_k, F_j))``
    over samples and positions (cosine over channels). Both are min-max normalised, ``w = D + λ V``,
    and step ``k`` gets ``round(num_samples w_k / Σ w)`` samples, the rounding surplus or deficit
    settled on the largest or the last non-empty steps as in the reference implementation.

    Args:
      features: ``(K, N, ..., C)``: the feature at each of ``K`` steps for ``N`` trajectories.
      num_samples: calibration set size.
      lam: λ, the weight of diversity.
      radius: the density radius (a per-dataset value in the paper: 3.0 CIFAR-10, 0.3 LSUN); None
        takes the median distance between steps.

    Returns:
      ``(K,)`` integer counts summing to ``num_samples``.
    """
    f = np.asarray(features, np.float64)
    steps = f.shape[0]
    flat = f.reshape(steps, -1)
    sq = np.sum(flat**2, axis=1)
    distance = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0) / flat.shape[1]
    off = ~np.eye(steps, dtype=bool)
    if radius is None:
        radius = float(np.median(distance[off]))
    density = np.sum((distance <= radius) & off, axis=1).astype(np.float64)
    unit = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-6)
    unit = unit.reshape(steps, -1, unit.shape[-1])
    cosine = np.einsum("kpc,jpc->kj", unit, unit)  # summed over samples and positions
    diversity = np.sum(np.where(off, unit.shape[1] - cosine, 0.0), axis=1)

    def normalise(a):
        span = a.max() - a.min()
        return (a - a.min()) / span if span > 0 else np.zeros_like(a)

    w = normalise(density) + lam * normalise(diversity)
    w = w if w.sum() > 0 else np.ones_like(w)
    counts = np.round(w / w.sum() * num_samples).astype(int)
    surplus = num_samples - int(counts.sum())
    if surplus >= 0:
        counts[np.argsort(-counts, kind="stable")[:surplus]] += 1
    else:
        for k in reversed(range(steps)):
            if surplus == 0:
                break
            if counts[k] > 0:
                counts[k] -= 1
                surplus += 1
    return counts
