"""Latent diffusion: a frozen VAE, its cached posteriors, the latent scale, and decoding samples.

A latent run trains any diffax network on ``scale · z`` with ``z`` drawn afresh every step from the
cached posterior ``N(mean, e^logvar)`` of each training image (``config.input.dataset="latents"``,
``config.input.data_dir`` the cache), and decodes its samples ``z / scale`` through the VAE, so
``diffax.generate`` and ``diffax.evaluate`` give images. The VAE is ``config.vae.workdir`` (a diffax
autoencoder run, its newest checkpoint) or ``config.vae.pretrained`` (a diffusers ``AutoencoderKL``
folder); it never trains here. The cache is written once:

    python -m diffax.latent --config=experiments/digits_latent.py

which encodes ``config.vae.source`` (an input section, e.g. the digits train split, or a tfds split
read a shard at a time and center-cropped as ADM and DiT do) in shards of
``config.vae.cache_shard_size`` images to ``CACHE/shard_<i>/`` (``mean.npy``, ``logvar.npy``,
``label.npy``, and with ``config.input.random_flip`` the mirrored images' ``mean_flipped.npy``,
``logvar_flipped.npy``; each folder written beside and renamed into place, so a killed job resumes at
the first missing shard), then the scale ``1 / std`` of one posterior draw per training latent
(Rombach et al. 2022, Sec. 4.3.2 and the ``scale_by_std`` of LDM; logged, in ``CACHE/metadata.json``,
and copied into the run's ``config.json`` as ``config.vae.scale``). Training reads the shards
memory-mapped, so the cache need not fit in host memory (ImageNet-256: 2 × 21 GB in float32).
"""

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from diffax.data.pipeline import _StepDerived, flip_mask

METADATA = "metadata.json"
CACHE_FORMAT = 2  # 1: one .npz per shard, read whole into memory
ARRAYS = ("mean", "logvar", "label")
MIRRORED_ARRAYS = ("mean_flipped", "logvar_flipped")


def is_latent_run(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` trains on cached VAE latents."""
    return config.input.dataset == "latents"


def load_vae(vae_config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """``(module, params)`` of the frozen VAE of ``config.vae`` (exactly one of workdir/pretrained).

    Raises:
      ValueError: one line naming ``config.vae.workdir`` or ``config.vae.pretrained``.
    """
    import diffax.models as models

    if bool(vae_config.workdir) == bool(vae_config.pretrained):
        raise ValueError(
            "config.vae.workdir: set exactly one of config.vae.workdir (a diffax autoencoder run) and"
            " config.vae.pretrained (a diffusers AutoencoderKL folder)."
        )
    if vae_config.pretrained:
        check_pretrained_class(vae_config.pretrained)
        return models.from_diffusers(vae_config.pretrained)
    from diffax import checkpoint, sharding, train_state
    from diffax import config as config_lib
    from diffax.autoencoding import system as autoencoder_system

    try:
        run = config_lib.load(vae_config.workdir)
    except OSError as e:
        raise ValueError(
            f"config.vae.workdir: {vae_config.workdir} has no config.json ({e.strerror})."
        ) from None
    if not autoencoder_system.is_autoencoder_run(run):
        raise ValueError(
            f"config.vae.workdir: {vae_config.workdir} is a {run.loss.name!r} run, not an autoencoder run"
            " (loss contperceptual)."
        )
    parts = train_state.build(run)
    mesh = sharding.make_mesh(
        ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices()[:1]
    )
    try:
        state, _ = checkpoint.restore_latest(vae_config.workdir, run, parts, mesh=mesh)
    except FileNotFoundError as e:
        raise ValueError(f"config.vae.workdir: {e}") from None
    return parts.module, state.params["autoencoder"]


def check_pretrained_class(folder: str) -> None:
    """Raises a one-line ``ValueError`` naming ``config.vae.pretrained`` unless ``folder`` holds a
    diffusers ``AutoencoderKL``."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            class_name = json.load(f).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"config.vae.pretrained: cannot read {folder}/config.json ({type(e).__name__})."
        ) from None
    if class_name != "AutoencoderKL":
        raise ValueError(
            f"config.vae.pretrained: {folder} holds a {class_name or 'model of unknown class'}, not an"
            " AutoencoderKL; name a VAE folder (e.g. stabilityai/sd-vae-ft-ema saved locally)."
        )


def encoder(module: Any) -> Any:
    """``encode(params, images) -> (mean, logvar)``, jitted."""
    return jax.jit(lambda params, x: module.apply({"params": params}, x, method="encode"))


def center_crop(image: np.ndarray, image_size: int) -> np.ndarray:
    """ADM's ``center_crop_arr`` (Dhariwal & Nichol 2021; DiT's preprocessing): halve with a box filter
    while the short side is at least twice ``image_size``, resize bicubically so the short side is
    ``image_size``, and cut the centre square. uint8 HWC (grey or RGB) in, uint8 RGB out."""
    from PIL import Image

    pil = Image.fromarray(np.asarray(image, np.uint8).squeeze(-1) if image.shape[-1] == 1 else image)
    pil = pil.convert("RGB")
    while min(pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = image_size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def num_source_images(vae_config: ml_collections.ConfigDict) -> int:
    """How many images ``config.vae.source`` holds (the tfds split's size, read from its metadata)."""
    source = vae_config.source
    if source.dataset == "digits":
        from diffax.data import digits as digits_lib

        return len(digits_lib.load_digits(split=source.split, upsample=1)[1])
    import tensorflow_datasets as tfds

    builder = tfds.builder(source.dataset, data_dir=source.data_dir or None)
    return int(builder.info.splits[source.split].num_examples)


def source_images(
    vae_config: ml_collections.ConfigDict, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start:stop`` of ``config.vae.source`` in [-1, 1] (unflipped, in order) and their labels.

    A tfds source is read as the split slice ``split[start:stop]`` only (ImageNet does not fit in
    memory), each image center-cropped to ``source.image_size`` as ADM and DiT do (:func:`center_crop`).
    """
    source = vae_config.source
    if source.dataset == "digits":
        from diffax.data import digits as digits_lib

        images, labels = digits_lib.load_digits(split=source.split, upsample=source.upsample)
        images = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        return images[start:stop], labels[start:stop]
    import tensorflow_datasets as tfds

    split = f"{source.split}[{start}:{'' if stop is None else stop}]"
    ds = tfds.load(source.dataset, split=split, data_dir=source.data_dir or None, shuffle_files=False)
    images, labels = [], []
    for example in tfds.as_numpy(ds):
        images.append(center_crop(example["image"], source.image_size))
        labels.append(example.get("label", 0))
    shape = (0, source.image_size, source.image_size, 3)
    images = np.stack(images) if images else np.zeros(shape, np.uint8)
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0), np.asarray(labels, np.int32)


def _shard_path(cache: str, index: int) -> str:
    return os.path.join(cache, f"shard_{index:05d}")


def _posterior_draw(mean: np.ndarray, logvar: np.ndarray, index: int) -> np.ndarray:
    """One posterior draw per latent of shard ``index`` (fixed seed per shard), for the scale."""
    eps = np.random.default_rng([0, index]).standard_normal(mean.shape).astype(np.float32)
    return mean + np.exp(0.5 * logvar) * eps


def _encode_all(encode: Any, params: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, logvar)`` of ``images``, encoded 100 at a time."""
    parts = [jax.device_get(encode(params, images[i : i + 100])) for i in range(0, len(images), 100)]
    return tuple(np.concatenate(a) for a in zip(*parts, strict=True))


def _write_shard(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``NAME.npy`` per array into ``path + ".partial"``, then renames the folder into place."""
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for name, array in arrays.items():
        np.save(os.path.join(partial, f"{name}.npy"), array, allow_pickle=False)
    os.replace(partial, path)


def write_cache(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Encodes ``config.vae.source`` into ``config.input.data_dir`` (resumable) and returns its metadata.

    Shard ``i`` (a folder of ``.npy`` arrays) holds images ``[i · size, (i + 1) · size)`` of the
    source, read and encoded on its own, so memory holds one shard and a killed job redoes only the
    missing ones. With ``config.input.random_flip`` each shard also holds the posteriors of the
    horizontally mirrored images (``mean_flipped``, ``logvar_flipped``): the VAE's convolutions are not
    mirror-symmetric, so the mirror's posterior is not the mirrored posterior. The scale is streamed
    over the shards (float64 sums of one posterior draw per unmirrored latent).
    """
    cache, v = config.input.data_dir, config.vae
    mirrored = bool(config.input.random_flip)
    module, params = load_vae(v)
    encode = encoder(module)
    os.makedirs(cache, exist_ok=True)
    size = int(v.cache_shard_size)
    num_images = num_source_images(v)
    num_shards = -(-num_images // size)
    for index in range(num_shards):
        path = _shard_path(cache, index)
        if os.path.isdir(path):
            logging.info("shard %d/%d already cached", index + 1, num_shards)
            continue
        images, labels = source_images(v, index * size, min((index + 1) * size, num_images))
        mean, logvar = _encode_all(encode, params, images)
        arrays = dict(mean=mean, logvar=logvar, label=labels.astype(np.int32))
        if mirrored:
            arrays["mean_flipped"], arrays["logvar_flipped"] = _encode_all(encode, params, images[:, :, ::-1])
        _write_shard(path, arrays)
        logging.info("cached shard %d/%d", index + 1, num_shards)
    count, total, squares = 0, 0.0, 0.0
    for index in range(num_shards):
        shard = open_shard(cache, index, mirrored=mirrored)
        draw = _posterior_draw(shard["mean"], shard["logvar"], index).astype(np.float64)
        count, total, squares = count + draw.size, total + draw.sum(), squares + np.square(draw).sum()
    std = float(np.sqrt(squares / count - (total / count) ** 2))
    metadata = dict(
        format=CACHE_FORMAT,
        num_images=num_images,
        num_shards=num_shards,
        mirrored=mirrored,
        latent_shape=list(shard["mean"].shape[1:]),
        scale=1.0 / std,
        latent_std=std,
        source=v.source.to_dict(),
        vae=dict(workdir=v.workdir, pretrained=v.pretrained),
    )
    with open(os.path.join(cache, METADATA + ".partial"), "w") as f:
        json.dump(metadata, f, indent=2)
    os.replace(os.path.join(cache, METADATA + ".partial"), os.path.join(cache, METADATA))
    logging.info("latent scale 1/std = %.6f (std %.4f of %d latents)", 1.0 / std, std, num_images)
    return metadata


def read_metadata(cache: str) -> dict[str, Any]:
    """The cache's metadata.

    Raises:
      ValueError: one line naming ``config.input.data_dir`` for a missing or damaged cache.
    """
    path = os.path.join(cache or "", METADATA)
    if not os.path.isfile(path):
        raise ValueError(
            f"config.input.data_dir: no latent cache at {cache!r} (no {METADATA}); write it first with"
            " python -m diffax.latent --config=<this experiment>."
        )
    try:
        with open(path) as f:
            metadata = json.load(f)
        assert metadata["format"] == CACHE_FORMAT and metadata["num_shards"] >= 1
    except (ValueError, KeyError, AssertionError, TypeError):
        raise ValueError(
            f"config.input.data_dir: {path} is damaged or of an older format; delete the cache and rerun"
            " python -m diffax.latent."
        ) from None
    return metadata


def open_shard(cache: str, index: int, *, mirrored: bool = False) -> dict[str, np.ndarray]:
    """Shard ``index``'s arrays (``mean``, ``logvar``, ``label``; with ``mirrored`` also
    ``mean_flipped``, ``logvar_flipped``), memory-mapped read-only: nothing is read until indexed.

    Raises:
      ValueError: one line naming ``config.input.data_dir`` when the shard is missing or damaged.
    """
    path = _shard_path(cache, index)
    names = ARRAYS + (MIRRORED_ARRAYS if mirrored else ())
    try:
        arrays = {
            name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r", allow_pickle=False)
            for name in names
        }
        shapes = {arrays[name].shape for name in names if name != "label"}
        assert len(shapes) == 1 and arrays["label"].shape == (arrays["mean"].shape[0],)
    except FileNotFoundError:
        raise ValueError(
            f"config.input.data_dir: {path} is missing; rerun python -m diffax.latent to finish it."
        ) from None
    except Exception:  # a truncated or altered file: header, size or shape errors
        raise ValueError(
            f"config.input.data_dir: {path} is damaged; delete it and rerun python -m diffax.latent."
        ) from None
    return arrays


def read_shards(
    cache: str, num_shards: int, *, only: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, logvar, label)`` of every shard read into memory and concatenated (or of shard ``only``).

    Raises:
      ValueError: one line naming ``config.input.data_dir`` when a shard is missing or damaged.
    """
    shards = [open_shard(cache, i) for i in (range(num_shards) if only is None else (only,))]
    return tuple(np.concatenate([shard[name] for shard in shards]) for name in ARRAYS)


class CachedPosteriors:
    """Every shard of a cache memory-mapped, rows gathered by global index (host memory holds only
    what a batch reads; the page cache keeps what fits)."""

    def __init__(self, cache: str, metadata: dict[str, Any], *, mirrored: bool = False):
        self.shards = [open_shard(cache, i, mirrored=mirrored) for i in range(metadata["num_shards"])]
        self.starts = np.cumsum([0] + [len(shard["label"]) for shard in self.shards])
        self.latent_shape = self.shards[0]["mean"].shape[1:]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, indices: np.ndarray, name: str) -> np.ndarray:
        """Rows ``indices`` (global image indices) of array ``name``."""
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        first = self.shards[0][name]
        rows = np.empty((len(indices), *first.shape[1:]), first.dtype)
        for s in np.unique(shard_of):
            here = shard_of == s
            rows[here] = self.shards[s][name][indices[here] - self.starts[s]]
        return rows


def _check_mirrored(input_config: ml_collections.ConfigDict, metadata: dict[str, Any]) -> None:
    if input_config.random_flip and not metadata.get("mirrored"):
        raise ValueError(
            f"config.input.random_flip: the cache at {input_config.data_dir} holds no mirrored"
            " posteriors; rerun python -m diffax.latent with random_flip=True into a new data_dir,"
            " or set random_flip=False."
        )


def check(config: ml_collections.ConfigDict) -> None:
    """Checks a latent run's cache and VAE against its input and model, before compiling.

    Raises:
      ValueError: one line naming the field.
    """
    metadata = read_metadata(config.input.data_dir)
    _check_mirrored(config.input, metadata)
    h, w, c = metadata["latent_shape"]
    if c != config.input.channels:
        raise ValueError(
            f"config.input.channels: {config.input.channels} but the VAE's latents have {c} channels;"
            f" set it to {c}."
        )
    if h != config.input.image_size or w != config.input.image_size:
        raise ValueError(
            f"config.input.image_size: {config.input.image_size} but the cached latents are {h}x{w};"
            f" set it to {h}."
        )
    v = config.vae
    if bool(v.workdir) == bool(v.pretrained):
        raise ValueError(
            "config.vae.workdir: a latent run decodes through its VAE; set exactly one of config.vae.workdir"
            " and config.vae.pretrained."
        )
    if v.pretrained:
        check_pretrained_class(v.pretrained)
    elif not os.path.isfile(os.path.join(v.workdir, "config.json")):
        raise ValueError(f"config.vae.workdir: {v.workdir} is not a diffax run (no config.json).")


def with_scale(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``config.vae.scale`` taken from the cache when it is 0 (so the run records it)."""
    if not is_latent_run(config) or config.vae.scale:
        return config
    scale = read_metadata(config.input.data_dir)["scale"]
    logging.info("latent scale from the cache: %.6f", scale)
    config = ml_collections.ConfigDict(config.to_dict())
    config.vae.scale = float(scale)
    return config


class LatentPipeline(_StepDerived):
    """Cached posteriors visited in a fresh permutation every epoch; each batch draws
    ``scale · (mean + e^{logvar/2} ε)`` with ε from ``(seed, step)``. The cache stays on disk,
    memory-mapped (:class:`CachedPosteriors`). With ``random_flip`` each example takes its mirrored
    image's posterior with probability ½ (the flips of the image pipelines, ``flip_mask``)."""

    def __init__(self, input_config: ml_collections.ConfigDict, *, scale: float, **shard):
        super().__init__(**shard)
        metadata = read_metadata(input_config.data_dir)
        _check_mirrored(input_config, metadata)
        self.random_flip = bool(input_config.random_flip)
        self.posteriors = CachedPosteriors(input_config.data_dir, metadata, mirrored=self.random_flip)
        self.scale = np.float32(scale or metadata["scale"])
        self.with_labels = bool(input_config.labels)

    def get(self, step: int) -> dict[str, np.ndarray]:
        indices = self.epoch_indices(step, len(self.posteriors))
        eps = np.random.default_rng([self.seed, step, 0x6C6174]).standard_normal(
            (self.global_batch, *self.posteriors.latent_shape), np.float32
        )[self.local_slice]
        mean, logvar = (self.posteriors.gather(indices, name) for name in ("mean", "logvar"))
        if self.random_flip:
            flip = flip_mask(
                step=step, seed=self.seed, global_batch=self.global_batch, local_slice=self.local_slice
            ).reshape(-1, 1, 1, 1)
            mean = np.where(flip, self.posteriors.gather(indices, "mean_flipped"), mean)
            logvar = np.where(flip, self.posteriors.gather(indices, "logvar_flipped"), logvar)
        z = mean + np.exp(0.5 * logvar) * eps
        batch = {"image": (self.scale * z).astype(np.float32)}
        if self.with_labels:
            batch["label"] = self.posteriors.gather(indices, "label")
        return batch


def decoder(config: ml_collections.ConfigDict) -> Any:
    """``decode(z_scaled) -> images`` through the run's frozen VAE (``z / scale``), jitted."""
    module, params = load_vae(config.vae)
    scale = float(config.vae.scale or read_metadata(config.input.data_dir)["scale"])
    decode = jax.jit(lambda z: module.apply({"params": params}, z / scale, method="decode"))
    return decode


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    try:
        write_cache(FLAGS.config)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A latent experiment file.", lock_config=False)
    app.run(main)
