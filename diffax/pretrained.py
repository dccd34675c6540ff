"""Sampling published checkpoints by their papers' protocols.

``load(folder)`` reads a diffusers model or pipeline folder (``models.from_diffusers``) with the
sampling protocol its paper reported results with, and ``make_sample_fn`` builds the sampler:

- DDPM (Ho et al. 2020; ``google/ddpm-cifar10-32``): linear betas 1e-4 to 0.02 over T = 1000, eps
  prediction, ancestral sampling with the fixed large variance (beta_t) over all 1000 steps, x_0
  predictions clipped to [-1, 1] (DDPM's ``clip_denoised``, diffusers' ``clip_sample``).
- DiT (Peebles & Xie 2023, FID 2.27 with ``sample_ddp.py``): the same betas, eps prediction with a
  learned variance (Nichol & Dhariwal's range interpolation), 250 respaced ancestral steps
  (``round(linspace(0, 999, 250))``), no clipping, classifier-free guidance 1.5 applied, as DiT's
  ``forward_with_cfg``, to the first 3 latent channels only (the rest of eps and the variance come
  from the conditional branch); ``guidance="standard"`` guides every eps channel. Latents are
  decoded by the SD VAE as ``vae.decode(z / scaling_factor)``.

A ``scheduler/scheduler_config.json`` (pipeline folders) or ``scheduler_config.json`` beside the
model's ``config.json`` sets T and the betas when present.
Any diffax sampler runs these networks too (``sampler=``, ``steps=``).
"""

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax import guidance as guidance_lib
from diffax import models, parameterization, samplers, schedules

GUIDANCE_KINDS = ("dit", "standard")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a published model was sampled for its paper's numbers."""

    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampler: str = "ddpm"
    variance: str = "fixed_large"
    steps: int = 1000
    spacing: str = "linspace"
    clip_denoised: bool = True
    guidance_scale: float | None = None
    guided_channels: int | None = None  # DiT's forward_with_cfg: 3


DDPM = Protocol()
DIT = Protocol(variance="learned", steps=250, clip_denoised=False, guidance_scale=1.5, guided_channels=3)


@dataclasses.dataclass
class Pretrained:
    """A loaded published model: the network, its sampling protocol, the data shape, an optional VAE."""

    module: nn.Module
    params: Any
    protocol: Protocol
    shape: tuple[int, int, int]  # (H, W, C) of what the network denoises
    num_classes: int | None
    vae: nn.Module | None = None
    vae_params: Any = None


def _model_folder(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None, dict[str, Any] | None]:
    """(network folder, VAE folder or None, scheduler config or None) of a model or pipeline folder."""
    for sub in ("unet", "transformer"):
        if (folder / sub / "config.json").is_file():
            vae = folder / "vae" if (folder / "vae" / "config.json").is_file() else None
            scheduler = folder / "scheduler" / "scheduler_config.json"
            return folder / sub, vae, json.loads(scheduler.read_text()) if scheduler.is_file() else None
    scheduler = folder / "scheduler_config.json"  # a single-model repository (google/ddpm-cifar10-32)
    return folder, None, json.loads(scheduler.read_text()) if scheduler.is_file() else None


def _with_scheduler(protocol: Protocol, scheduler: dict[str, Any] | None) -> Protocol:
    if scheduler is None:
        return protocol
    if scheduler.get("beta_schedule", "linear") != "linear":
        raise models.ConversionError(
            f"pretrained: scheduler beta_schedule={scheduler['beta_schedule']!r}; "
            "the DDPM and DiT protocols use 'linear'."
        )
    return dataclasses.replace(
        protocol,
        num_train_steps=scheduler.get("num_train_timesteps", protocol.num_train_steps),
        beta_start=scheduler.get("beta_start", protocol.beta_start),
        beta_end=scheduler.get("beta_end", protocol.beta_end),
    )


def load(folder: str | pathlib.Path, *, vae: str | pathlib.Path | None = None, **fields: Any) -> Pretrained:
    """A published model (a diffusers model or pipeline folder) with its paper's sampling protocol.

    Args:
      folder: a ``UNet2DModel`` (DDPM protocol) or DiT (DiT protocol) folder, a pipeline folder
        holding ``unet/`` or ``transformer/`` (and ``scheduler/``, ``vae/``), or the original DiT
        release's ``.pt`` file (``models.from_dit_checkpoint``).
      vae: an ``AutoencoderKL`` folder for latent models (default: the pipeline's ``vae/``).
      **fields: network fields to set (e.g. ``attention_impl="cpu"``).

    Raises:
      ConversionError: a folder that does not load, or a latent model without a VAE.
    """
    path = pathlib.Path(folder)
    if path.suffix == ".pt":  # the original DiT release: a state dict, read with weights_only=True
        net_folder, pipeline_vae, scheduler = path, None, None
        module, params = models.from_dit_checkpoint(path, **fields)
        config = {"in_channels": params["patch"]["kernel"].shape[2]}
    else:
        net_folder, pipeline_vae, scheduler = _model_folder(path)
        module, params = models.from_diffusers(net_folder, **fields)
        config = json.loads((net_folder / "config.json").read_text())
    if isinstance(module, models.DiT):
        side = module.pos_embed_base * module.patch_size
        shape, protocol, classes = (side, side, config.get("in_channels", 4)), DIT, module.num_classes
        vae = vae or pipeline_vae
        if vae is None:
            raise models.ConversionError(
                f"pretrained: {folder} is a latent DiT; pass --vae=FOLDER (the SD VAE)."
            )
    elif isinstance(module, models.UNet):
        size = config.get("sample_size")
        if not isinstance(size, int):
            raise models.ConversionError(f"pretrained: {net_folder}/config.json has no int sample_size.")
        shape, protocol, classes = (size, size, config.get("in_channels", 3)), DDPM, None
    else:
        raise models.ConversionError(
            f"pretrained: {folder} holds a {type(module).__name__}, not a diffusion network."
        )
    out = Pretrained(module, params, _with_scheduler(protocol, scheduler), shape, classes)
    if vae is not None:
        out.vae, out.vae_params = models.from_diffusers(vae)
        if not isinstance(out.vae, models.AutoencoderKL) or out.vae.latent_channels != shape[-1]:
            raise models.ConversionError(
                f"pretrained: --vae={vae} is not an AutoencoderKL with {shape[-1]} latent channels."
            )
    return out


def _clip_x0(out: jax.Array, x: jax.Array, t: jax.Array, schedule: schedules.Schedule) -> jax.Array:
    """An eps output (variance channels after it) whose implied x_0 is clipped to [-1, 1] (DDPM's
    ``clip_denoised``): eps = (x_t - alpha clip(x_0)) / sigma."""
    channels = x.shape[-1]
    x0, _ = parameterization.to_x0_eps(schedule, out[..., :channels], x, t, prediction="eps")
    _, eps = parameterization.to_x0_eps(schedule, jnp.clip(x0, -1.0, 1.0), x, t, prediction="x0")
    return jnp.concatenate([eps.astype(out.dtype), out[..., channels:]], axis=-1)


def make_sample_fn(
    model: Pretrained,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    guidance: str = "dit",
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``sample_fn(key, labels) -> images`` (float NHWC in about [-1, 1]) by the model's protocol.

    Args:
      model: from ``load``.
      sampler: a diffax sampler name instead of the protocol's ancestral DDPM (its learned or fixed
        variance applies only to ``"ddpm"``).
      steps: sampler steps instead of the protocol's.
      guidance_scale: classifier-free guidance scale instead of the protocol's (1: none).
      guidance: ``"dit"`` (guide the first 3 latent channels, as DiT's paper numbers) or
        ``"standard"`` (guide every eps channel); the variance comes from the conditional branch.
    """
    if guidance not in GUIDANCE_KINDS:
        raise ValueError(f"pretrained: guidance={guidance!r}; use one of {GUIDANCE_KINDS}.")
    p = model.protocol
    schedule = schedules.get(
        "linear", num_timesteps=p.num_train_steps, beta_start=p.beta_start, beta_end=p.beta_end
    )
    name = p.sampler if sampler is None else sampler
    options = {"variance": p.variance} if name == "ddpm" else {}
    ts = samplers.timesteps(schedule, num_steps=p.steps if steps is None else steps, spacing=p.spacing)
    channels = model.shape[-1]
    scale = p.guidance_scale if guidance_scale is None else guidance_scale
    guided_channels = p.guided_channels if guidance == "dit" else channels

    learned = options.get("variance") == "learned"

    def network(params, x, t, cond):
        out = model.module.apply({"params": params}, x, t, cond)
        out = _clip_x0(out, x, t, schedule) if p.clip_denoised else out
        return out if learned else out[..., :channels]

    @functools.partial(jax.jit, static_argnums=1)
    def prior(key, num):
        return schedule.prior_sample(key, (num, *model.shape))

    @jax.jit
    def decode(vae_params, z):
        return model.vae.apply({"params": vae_params}, z / model.vae.scaling_factor, method="decode")

    def sample_fn(key, labels):
        labels = jnp.asarray(labels, jnp.int32)
        if model.num_classes is None:
            fn = jax.tree_util.Partial(network, model.params, cond=None)
        elif scale is None or scale == 1.0:
            fn = jax.tree_util.Partial(network, model.params, cond=labels)
        else:
            null = jnp.int32(model.num_classes)
            guided = guidance_lib.classifier_free(
                jax.tree_util.Partial(network, model.params), scale, null_cond=null, channels=guided_channels
            )
            fn = jax.tree_util.Partial(guided, cond=labels)
        noise_key, sample_key = jax.random.split(key)
        x_T = prior(noise_key, labels.shape[0])
        z = samplers.sample(
            fn, schedule, x_T, sampler=name, timesteps=ts, prediction="eps", key=sample_key, **options
        )
        return z if model.vae is None else decode(model.vae_params, z)

    return sample_fn


def sample_labels(key: jax.Array, num: int, num_classes: int | None) -> np.ndarray:
    """Uniform random class labels (DiT's ``sample_ddp.py``), or zeros for an unconditional model."""
    if num_classes is None:
        return np.zeros((num,), np.int32)
    return np.asarray(jax.random.randint(key, (num,), 0, num_classes), np.int32)


def load_images(path: str | pathlib.Path, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3) images: ``arr_0``/``images`` of an ``.npz``, or every JPEG/PNG of a
    folder, centre-cropped to a square and resized (bicubic) as the SD VAE's evaluation on COCO does."""
    from PIL import Image

    from diffax.evaluation import read_image_batch

    path = pathlib.Path(path)
    if path.suffix == ".npz":
        images = read_image_batch(path)
        if images.shape[1:3] != (size, size):
            raise ValueError(f"{path}: images are {images.shape[1:3]}, not {size}x{size}.")
        return images
    names = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not names:
        raise ValueError(f"{path}: no .npz file and no JPEG/PNG images in the folder.")
    out = np.empty((len(names), size, size, 3), np.uint8)
    for i, name in enumerate(names):
        image = Image.open(name).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out[i] = np.asarray(image)
    return out


def reconstruction_psnr(
    vae: nn.Module, params: Any, images: np.ndarray, *, batch_size: int = 16
) -> tuple[float, np.ndarray]:
    """Mean PSNR (dB, 8-bit) of uint8 NHWC images reconstructed through the VAE's posterior mean.

    Returns:
      ``(mean PSNR, per-image PSNR)``; each image's PSNR is ``10 log10(255^2 / MSE)`` of the
      reconstruction rounded to uint8.
    """
    from diffax.generate import to_uint8

    @jax.jit
    def reconstruct(params, x):
        mean, _ = vae.apply({"params": params}, x, method="encode")
        return vae.apply({"params": params}, mean, method="decode")

    psnr = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        rec = to_uint8(np.asarray(reconstruct(params, batch.astype(np.float32) / 127.5 - 1.0)))
        mse = np.mean((rec.astype(np.float64) - batch.astype(np.float64)) ** 2, axis=(1, 2, 3))
        psnr.append(10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-12)))
    per_image = np.concatenate(psnr)
    return float(per_image.mean()), per_image


def main(argv: list[str] | None = None) -> None:
    """VAE reconstruction PSNR: ``python -m diffax.pretrained --vae=FOLDER --images=DIR_OR_NPZ``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--vae", required=True, help="An AutoencoderKL folder (diffusers layout).")
    parser.add_argument("--images", required=True, help="A folder of JPEG/PNG images, or an .npz (arr_0).")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)
    vae, params = models.from_diffusers(args.vae)
    if not isinstance(vae, models.AutoencoderKL):
        parser.error(f"--vae={args.vae} holds a {type(vae).__name__}, not an AutoencoderKL.")
    images = load_images(args.images, args.size)
    psnr, _ = reconstruction_psnr(vae, params, images, batch_size=args.batch_size)
    print(json.dumps(dict(vae=args.vae, images=args.images, num_images=len(images), psnr=psnr)))


if __name__ == "__main__":
    main()
