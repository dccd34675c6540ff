"""A tensorflow-datasets input pipeline whose position is saved with the checkpoints.

Each process reads its own slice of the split (``tfds.split_for_jax_process``), shuffles encoded
records, decodes, center-crops and resizes to a square uint8 image, and batches. The tf.data iterator
is checkpointed per process (``tf.train.Checkpoint``), so a restarted run sees exactly the examples an
uninterrupted one would have. An example that cannot be decoded stops the run with a ``ValueError``
naming its tfds id (``<file>__<index>``).
"""

import functools
import glob
import itertools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def _preprocess(image: tf.Tensor, *, image_size: int) -> tf.Tensor:
    """Center-crops to a square and resizes (box filter when shrinking) to ``image_size``, uint8."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)
    image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2, side, side)
    if image.shape[0] == image_size and image.shape[1] == image_size:
        return image
    resized = tf.image.resize(image, (image_size, image_size), method="area", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _first_bad_record(builder, split, example_fn) -> str | None:
    """The tfds id (``<file>__<index>``) of the first example of ``split`` that ``example_fn`` fails on.

    The examples are read twice in file order: all ids, and the ids of the examples that decode
    (``ignore_errors`` drops the others); the first id missing from the second list is the bad one.
    """
    read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False)
    decoders = {"image": tfds.decode.SkipDecoding()}
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config, decoders=decoders)
    ids = ds.map(lambda example: example["tfds_id"])
    decoded = ds.map(lambda example: (example["tfds_id"], example_fn(example)["image"]))
    good = decoded.ignore_errors().map(lambda tfds_id, image: tfds_id)
    for tfds_id, good_id in itertools.zip_longest(ids.as_numpy_iterator(), good.as_numpy_iterator()):
        if tfds_id != good_id:
            return tfds_id.decode()
    return None


class TfdsPipeline:
    """Local batches of one process, read in order; ``save``/``restore`` pin the position to a step.

    Args:
      name: tfds dataset name (registered builder, or prepared under ``data_dir``).
      split: split name, e.g. ``"train"``; each process reads ``1/process_count`` of it.
      data_dir: tfds data directory, or ``None`` for the default.
      local_batch: examples per batch on this process.
      image_size: side of the square output images.
      labels: whether to yield the ``"label"`` feature.
      shuffle_buffer: examples in the shuffle buffer (encoded, before decoding).
      prefetch: batches prefetched by tf.data.
      seed: shuffle seed; combined with the process index.
      process_index: this process.
      process_count: number of processes.
    """

    def __init__(
        self,
        name: str,
        *,
        split: str,
        data_dir: str | None,
        local_batch: int,
        image_size: int,
        labels: bool,
        shuffle_buffer: int,
        prefetch: int,
        seed: int,
        process_index: int,
        process_count: int,
    ):
        builder = tfds.builder(name, data_dir=data_dir)
        process_split = tfds.split_for_jax_process(
            split, process_index=process_index, process_count=process_count, drop_remainder=True
        )
        process_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0] >> 1)
        options = tf.data.Options()
        options.deterministic = True
        read_config = tfds.ReadConfig(options=options, shuffle_seed=process_seed, try_autocache=False)
        ds = builder.as_dataset(
            split=process_split,
            shuffle_files=True,
            read_config=read_config,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        image_feature = builder.info.features["image"]

        def example_fn(example):
            image = _preprocess(image_feature.decode_example(example["image"]), image_size=image_size)
            out = {"image": image}
            if labels:
                out["label"] = tf.cast(example["label"], tf.int32)
            return out

        self._find_bad_record = functools.partial(_first_bad_record, builder, process_split, example_fn)
        self._name = f"{name}/{split}"
        ds = ds.repeat().shuffle(shuffle_buffer, seed=process_seed, reshuffle_each_iteration=True)
        ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local_batch, drop_remainder=True).prefetch(prefetch)
        self._iterator = iter(ds)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        self._process_index = process_index
        self._next_step = 0

    def get(self, step: int) -> dict[str, np.ndarray]:
        """Returns the uint8 local batch for ``step``; steps must be read in order from the restored one."""
        if step != self._next_step:
            raise ValueError(f"step={step}: the tfds pipeline is positioned at step {self._next_step}.")
        try:
            batch = next(self._iterator)
        except tf.errors.InvalidArgumentError as e:  # an undecodable or malformed example
            record = self._find_bad_record()
            if record is None:
                raise
            reason = e.message.strip().splitlines()[-1][:200]
            raise ValueError(
                f"config.input.dataset: record {record} of {self._name} cannot be decoded ({reason});"
                " fix or remove it and prepare the dataset again."
            ) from None
        self._next_step += 1
        return {k: v.numpy() for k, v in batch.items()}

    def _path(self, directory: str, step: int) -> str:
        return os.path.join(directory, f"process_{self._process_index}", f"step_{step}")

    def save(self, directory: str, step: int, *, keep: int) -> None:
        """Writes the iterator position for ``step`` and drops all but the newest ``keep`` positions."""
        if step != self._next_step:
            raise ValueError(f"step={step}: the tfds pipeline is positioned at step {self._next_step}.")
        self._checkpoint.write(self._path(directory, step))
        saved = glob.glob(self._path(directory, 0)[: -len("0")] + "*.index")
        steps = sorted(int(p[: -len(".index")].rsplit("_", 1)[1]) for p in saved)
        for old in steps[:-keep]:
            for f in glob.glob(self._path(directory, old) + ".*"):
                os.remove(f)

    def restore(self, directory: str, step: int) -> None:
        """Positions the iterator where it was when ``save(directory, step)`` ran."""
        path = self._path(directory, step)
        if not tf.io.gfile.exists(path + ".index"):
            raise FileNotFoundError(f"no saved tfds input position for step {step} at {path}.")
        self._checkpoint.read(path).assert_consumed()
        self._next_step = step
