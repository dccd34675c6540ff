"""Named model presets, construction from configs, and abstract (shape-only) parameters."""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax.models.autoencoder import AutoencoderKL
from diffax.models.dit import DiT
from diffax.models.unet import UNet

# DiT sizes (depth, hidden_size, num_heads): Peebles & Xie 2023, Table 1; "g": Fei et al. 2024, Table 1.
_DIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
_DIT_G = (40, 1408, 16)
# DiT-MoE models of Fei et al. 2024, Table 1: (size, experts E, activated K); n_s = 2 shared experts.
_DIT_MOE = (("s", 8, 2), ("s", 16, 2), ("b", 8, 2), ("l", 8, 2), ("xl", 8, 2), ("g", 16, 2))

PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # Rombach et al. 2022, App. G: the KL autoencoders; f8 is the Stable Diffusion VAE (kl-f8, z = 4),
    # f4 the LDM kl-f4 (z = 3); LDM's `autoencoder_kl_*` configs, 2 residual blocks per level.
    "autoencoder_kl_f8": (
        AutoencoderKL,
        dict(base_channels=128, channel_mult=(1, 2, 4, 4), latent_channels=4),
    ),
    "autoencoder_kl_f4": (
        AutoencoderKL,
        dict(base_channels=128, channel_mult=(1, 2, 4), latent_channels=3, scaling_factor=1.0),
    ),
    # Ho et al. 2020, App. B: 35.7M parameters at 32x32x3.
    "unet_ddpm_cifar10": (
        UNet,
        dict(
            base_channels=128,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16,),
            num_heads=1,
            dropout=0.1,
            norm_eps=1e-6,
        ),
    ),
    # Nichol & Dhariwal 2021 / Dhariwal & Nichol 2021 (ADM, class-conditional ImageNet 64x64x3).
    "unet_adm_imagenet64": (
        UNet,
        dict(
            base_channels=192,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            attention_resolutions=(32, 16, 8),
            head_channels=64,
            dropout=0.1,
            time_injection="scale_shift",
            resblock_updown=True,
            num_classes=1000,
            learned_variance=True,
        ),
    ),
    # Peebles & Xie 2023: ImageNet 256x256 through the SD VAE, so 32x32x4 latents, learned sigma.
    **{
        f"dit_{size}_{patch}": (
            DiT,
            dict(patch_size=patch, depth=depth, hidden_size=hidden, num_heads=heads),
        )
        for size, (depth, hidden, heads) in _DIT_SIZES.items()
        for patch in (2, 4, 8)
    },
    # Fei et al. 2024 (DiT-MoE-<size>/2-<E>E<K>A): every block's MLP a mixture of SwiGLU experts.
    **{
        f"dit_moe_{size}_2_{experts}e{active}a": (
            DiT,
            dict(
                patch_size=2,
                depth=depth,
                hidden_size=hidden,
                num_heads=heads,
                num_experts=experts,
                experts_per_token=active,
                num_shared_experts=2,
                balance_loss_weight=0.005,
            ),
        )
        for size, experts, active in _DIT_MOE
        for depth, hidden, heads in [_DIT_SIZES.get(size, _DIT_G)]
    },
}


def get(name: str, **overrides: Any) -> nn.Module:
    """Builds the Flax module of a named preset, with fields overridden.

    Args:
      name: a key of ``PRESETS``, e.g. ``"unet_ddpm_cifar10"`` or ``"dit_xl_2"``.
      **overrides: module fields to change, e.g. ``dtype="bfloat16"``, ``remat=True``.

    Returns:
      The (unbound) Flax module.

    Raises:
      ValueError: for an unknown name or field, or an inconsistent setting.
    """
    if name not in PRESETS:
        raise ValueError(f"models.get: unknown model {name!r}; known: {', '.join(sorted(PRESETS))}.")
    cls, defaults = PRESETS[name]
    fields = sorted(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"models.get: {name!r} ({cls.__name__}) has no field(s) {unknown}; known: {', '.join(fields)}."
        )
    kwargs = {**defaults, **overrides}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)


def from_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> nn.Module:
    """Builds a module from a config with ``name`` (a preset) and any field overrides.

    Example: ``ConfigDict(dict(name="dit_b_4", dtype="bfloat16", remat=True))``.
    """
    items = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    if "name" not in items:
        raise ValueError("models.from_config: config has no 'name'; set config.name to a preset.")
    return get(items.pop("name"), **items)


def abstract_params(module: nn.Module, input_shape: Sequence[int], *, cond: Any = None) -> Any:
    """The module's parameter pytree as ``jax.ShapeDtypeStruct``s, via ``jax.eval_shape``.

    Nothing is materialised. Leaves stay wrapped in ``nn.LogicallyPartitioned`` so that
    ``nn.get_partition_spec`` gives the logical axes; ``nn.meta.unbox`` gives plain structs.

    Args:
      module: a model from ``get``/``from_config``.
      input_shape: (B, H, W, C) of x.
      cond: what the model is called with (arrays or ``jax.ShapeDtypeStruct``s); None gives
        the null-label path for a class-conditional model. Cross-attention models need
        ``{"context": ...}``.

    Returns:
      The ``"params"`` collection of ``module.init`` as a pytree of ``jax.ShapeDtypeStruct``.
    """
    shape = tuple(input_shape)
    if len(shape) != 4:
        raise ValueError(f"abstract_params: input_shape={shape}; use (batch, height, width, channels).")

    def init(cond: Any) -> Any:
        key = jax.random.key(0)
        x, t = jnp.zeros(shape, jnp.float32), jnp.zeros(shape[:1], jnp.float32)
        return module.init({"params": key, "dropout": key}, x, t, cond, train=False)["params"]

    return jax.eval_shape(init, cond)


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter pytree (arrays, ``ShapeDtypeStruct``s, boxed or not)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.meta.unbox(tree)))
