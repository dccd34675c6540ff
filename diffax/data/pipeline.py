"""Input pipelines that yield each process's share of the global batch, and their assembly into a global
``jax.Array``.

Every pipeline has ``get(step) -> local batch`` plus ``save``/``restore`` of its position. The built-in
sources (digits, mixture) derive each batch from the step alone, so they need no saved state and a
restarted run sees the same data; the tfds pipeline checkpoints its iterator. All sources finish
through :func:`finish_batch` (random flip, uint8 → [-1, 1]) and :func:`to_global`.
"""

from typing import Protocol

import jax
import ml_collections
import numpy as np

from diffax.data import digits as digits_lib
from diffax.data import mixture as mixture_lib

# text, markov: token runs (data/text.py); latents: cached VAE posteriors (diffax.latent)
BUILTIN_DATASETS = ("digits", "mixture", "text", "markov", "latents")


class Pipeline(Protocol):
    """What the training loop needs from an input pipeline."""

    def get(self, step: int) -> dict[str, np.ndarray]:
        """The local batch for ``step``: ``"image"`` float32 NHWC in [-1, 1], optional int32 ``"label"``."""

    def save(self, directory: str, step: int, *, keep: int) -> None:
        """Records the position after ``step`` batches (no-op for step-derived pipelines)."""

    def restore(self, directory: str, step: int) -> None:
        """Returns to a position recorded by ``save``."""


def flip_mask(*, step: int, seed: int, global_batch: int, local_slice: slice) -> np.ndarray:
    """Which examples of step ``step`` are mirrored (probability ½ each): drawn for the whole global
    batch from ``(seed, step)``, this process's ``local_slice`` of them."""
    return np.random.default_rng([seed, step, 0x666C6970]).random(global_batch)[local_slice] < 0.5


def finish_batch(
    batch: dict[str, np.ndarray],
    *,
    step: int,
    seed: int,
    random_flip: bool,
    global_batch: int,
    local_slice: slice,
) -> dict[str, np.ndarray]:
    """Flips (when asked) and scales a local uint8 batch to float32 in [-1, 1].

    The flips for step ``step`` are drawn for the whole global batch from ``(seed, step)`` and this
    process takes ``local_slice`` of them, so they do not depend on the number of processes.
    """
    images = batch["image"]
    if random_flip:
        flip = flip_mask(step=step, seed=seed, global_batch=global_batch, local_slice=local_slice)
        images = np.where(flip.reshape(-1, 1, 1, 1), images[:, :, ::-1], images)
    return dict(batch, image=images.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


class _ProcessShare:
    """The seed, the global batch size and this process's slice of every global batch."""

    def __init__(self, *, global_batch: int, seed: int, process_index: int, process_count: int):
        self.global_batch = global_batch
        self.seed = seed
        local = global_batch // process_count
        self.local_slice = slice(process_index * local, (process_index + 1) * local)


class _StepDerived(_ProcessShare):
    """A pipeline whose batch is a pure function of ``(seed, step)``: its position needs no saving."""

    def epoch_indices(self, step: int, n: int) -> np.ndarray:
        """This process's rows of step ``step`` among ``n`` examples visited in a fresh permutation
        per epoch: global example ``p`` is ``perm_e[p mod n]`` of epoch ``e = p div n``, ``perm_e``
        drawn from ``(seed, e)``."""
        positions = step * self.global_batch + np.arange(self.local_slice.start, self.local_slice.stop)
        epochs, offsets = np.divmod(positions, n)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            indices[epochs == epoch] = perm[offsets[epochs == epoch]]
        return indices

    def save(self, directory: str, step: int, *, keep: int) -> None:
        del directory, step, keep

    def restore(self, directory: str, step: int) -> None:
        del directory, step


class ArrayPipeline(_StepDerived):
    """In-memory uint8 images visited in a fresh permutation every epoch, positioned by the step.

    Global example ``p`` (counting from step 0) is example ``perm_e[p mod N]`` of epoch ``e = p div N``
    with ``perm_e`` drawn from ``(seed, e)``; process ``i`` takes its slice of each global batch.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        *,
        global_batch: int,
        seed: int,
        random_flip: bool,
        process_index: int,
        process_count: int,
    ):
        super().__init__(
            global_batch=global_batch, seed=seed, process_index=process_index, process_count=process_count
        )
        self.images, self.labels, self.random_flip = images, labels, random_flip

    def _indices(self, step: int) -> np.ndarray:
        return self.epoch_indices(step, len(self.images))

    def get(self, step: int) -> dict[str, np.ndarray]:
        indices = self._indices(step)
        batch = {"image": self.images[indices]}
        if self.labels is not None:
            batch["label"] = self.labels[indices]
        return finish_batch(
            batch,
            step=step,
            seed=self.seed,
            random_flip=self.random_flip,
            global_batch=self.global_batch,
            local_slice=self.local_slice,
        )


class MixturePipeline(_StepDerived):
    """Fresh draws from the analytic Gaussian mixture; step ``s`` uses the generator seeded ``(seed, s)``."""

    def __init__(
        self,
        means: np.ndarray,
        *,
        std: float,
        labels: bool,
        global_batch: int,
        seed: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(
            global_batch=global_batch, seed=seed, process_index=process_index, process_count=process_count
        )
        self.means, self.std, self.labels = means, std, labels

    def get(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        images, labels = mixture_lib.mixture_sample(self.means, std=self.std, size=self.global_batch, rng=rng)
        batch = {"image": images[self.local_slice]}
        if self.labels:
            batch["label"] = labels[self.local_slice]
        return batch


class _TfdsFinished(_ProcessShare):
    """Wraps the tfds pipeline so its uint8 batches pass through :func:`finish_batch`."""

    def __init__(self, tfds_pipeline, *, random_flip: bool, **shard):
        super().__init__(**shard)
        self._inner, self.random_flip = tfds_pipeline, random_flip

    def get(self, step: int) -> dict[str, np.ndarray]:
        return finish_batch(
            self._inner.get(step),
            step=step,
            seed=self.seed,
            random_flip=self.random_flip,
            global_batch=self.global_batch,
            local_slice=self.local_slice,
        )

    def save(self, directory: str, step: int, *, keep: int) -> None:
        self._inner.save(directory, step, keep=keep)

    def restore(self, directory: str, step: int) -> None:
        self._inner.restore(directory, step)


def make_pipeline(
    input_config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    latent_scale: float = 0.0,
) -> Pipeline:
    """Builds the input pipeline that ``input_config`` describes, for one process.

    Args:
      input_config: the ``config.input`` section (see ``diffax.config.base_config``).
      seed: data seed.
      process_index: this process (default ``jax.process_index()``).
      process_count: number of processes (default ``jax.process_count()``).
      latent_scale: for ``"latents"``: the scale of the latents (0: the cache's ``1 / std``).

    Returns:
      A :class:`Pipeline` yielding local batches of ``batch_size / process_count`` examples.
    """
    cfg = input_config
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    shard = dict(
        global_batch=cfg.batch_size, seed=seed, process_index=process_index, process_count=process_count
    )
    if cfg.dataset in ("text", "markov"):
        from diffax.data import text  # imported here: text.py builds on this module

        return text.make_token_pipeline(cfg, **shard)
    if cfg.dataset == "latents":
        from diffax import latent  # imported here: diffax.latent builds on this module

        return latent.LatentPipeline(cfg, scale=latent_scale, **shard)
    if cfg.dataset == "digits":
        images, labels = digits_lib.load_digits(split=cfg.split, upsample=cfg.upsample)
        return ArrayPipeline(images, labels if cfg.labels else None, random_flip=cfg.random_flip, **shard)
    if cfg.dataset == "mixture":
        means = mixture_lib.mixture_means(
            num_components=cfg.mixture_components,
            image_shape=(cfg.image_size, cfg.image_size, cfg.channels),
            seed=cfg.mixture_seed,
        )
        return MixturePipeline(means, std=cfg.mixture_std, labels=cfg.labels, **shard)
    from diffax.data import tfds_source  # imported here: TensorFlow loads only for tfds datasets

    local_batch = cfg.batch_size // process_count
    inner = tfds_source.TfdsPipeline(
        cfg.dataset,
        split=cfg.split,
        data_dir=cfg.data_dir,
        local_batch=local_batch,
        image_size=cfg.image_size,
        labels=cfg.labels,
        shuffle_buffer=cfg.shuffle_buffer,
        prefetch=cfg.prefetch,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return _TfdsFinished(inner, random_flip=cfg.random_flip, **shard)


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles every process's local batch into global arrays split over ``sharding``'s batch axes.

    Args:
      batch: this process's rows, leading axis ``global_batch / process_count``.
      sharding: a sharding of the leading axis (e.g. ``diffax.sharding.batch_sharding(mesh)``).

    Returns:
      The same keys as global ``jax.Array``s with leading axis ``global_batch``.
    """
    count = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count, *v.shape[1:]))
        for k, v in batch.items()
    }


def image_shape(input_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """``(H, W, C)`` of the images ``input_config`` yields."""
    return (input_config.image_size, input_config.image_size, input_config.channels)
