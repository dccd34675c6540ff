"""A small MLP classifier of scikit-learn's 8×8 digits: the offline default's feature extractor.

It is trained deterministically (fixed seeds, one jitted ``lax.scan`` over all steps, seconds on
a CPU) on the ``train`` split of :func:`diffax.data.digits.load_digits` the first time it
is needed, then cached as ``digits_classifier_<hash>.npz`` in ``$DIFFAX_CACHE_DIR`` (default
``~/.cache/diffax``); the hash covers the training recipe and the training split, so a changed
recipe or split never reads a stale file. Its penultimate layer (64 ReLU units) gives the
"digits FD", its logits the digits IS, the confidence fraction and the class histogram.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from diffax.data.digits import load_digits
from diffax.evaluation._npz import load_tree_npz, save_tree_npz

__all__ = [
    "DigitsClassifier",
    "digits_classifier_params",
    "digits_classifier_shapes",
    "digits_features_and_logits",
    "load_digits_reference",
]

DIGITS_SIZE = 8
NUM_DIGIT_CLASSES = 10
# Bump ``version`` whenever DigitsClassifier or _train changes: it renames the cached weights.
_RECIPE = dict(version=1, seed=0, epochs=40, batch_size=100, learning_rate=2e-3, weight_decay=1e-4)


class DigitsClassifier(nn.Module):
    """A 256-unit and a 64-unit ReLU layer, then 10 logits.

    Takes (N, 8, 8, 1) images in [-1, 1]; returns ``(features, logits)`` of shapes (N, 64) and
    (N, 10), the features being the hidden layer after its ReLU.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        features = nn.relu(nn.Dense(64)(x))
        return features, nn.Dense(NUM_DIGIT_CLASSES)(features)


def load_digits_reference(split: str) -> tuple[np.ndarray, np.ndarray]:
    """A digits split as float32 (N, 8, 8, 1) images in [-1, 1] and int32 labels."""
    images, labels = load_digits(split=split)
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0), labels


def _to_8x8(images: ArrayLike) -> jax.Array:
    """(N, 8k, 8k[, 1]) images → (N, 8, 8, 1) by averaging k×k blocks."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % DIGITS_SIZE:
        raise ValueError(
            "images must have shape (N, 8k, 8k) or (N, 8k, 8k, 1) for an integer k, "
            f"got {jnp.shape(images)}; digits metrics take single-channel digits."
        )
    n, k = images.shape[0], images.shape[1] // DIGITS_SIZE
    blocks = images.reshape(n, DIGITS_SIZE, k, DIGITS_SIZE, k)
    return jnp.mean(blocks, axis=(2, 4)).reshape(n, DIGITS_SIZE, DIGITS_SIZE, 1)


def _train(recipe: Mapping) -> dict:
    images, labels = map(jnp.asarray, load_digits_reference("train"))
    n, batch = images.shape[0], recipe["batch_size"]
    steps_per_epoch = n // batch
    model = DigitsClassifier()
    init_key, order_key = jax.random.split(jax.random.key(recipe["seed"]))
    params = model.init(init_key, images[:1])["params"]
    optimizer = optax.adamw(recipe["learning_rate"], weight_decay=recipe["weight_decay"])
    orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(order_key, recipe["epochs"]))
    batches = orders[:, : steps_per_epoch * batch].reshape(-1, batch)

    def loss_fn(p, idx):
        _, logits = model.apply({"params": p}, images[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

    def step(state, idx):
        p, opt_state = state
        grads = jax.grad(loss_fn)(p, idx)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), None

    (params, _), _ = jax.jit(lambda s: jax.lax.scan(step, s, batches))((params, optimizer.init(params)))
    return jax.device_get(params)


@functools.cache
def _recipe_digest() -> str:
    """A hash of the training recipe and the training split, naming the cached weights."""
    images, labels = load_digits(split="train")
    digest = hashlib.sha256(json.dumps(_RECIPE, sort_keys=True).encode())
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    return digest.hexdigest()[:12]


def _cache_path(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is None:
        cache_dir = os.environ.get("DIFFAX_CACHE_DIR", os.path.join("~", ".cache", "diffax"))
    return os.path.join(os.path.expanduser(cache_dir), f"digits_classifier_{_recipe_digest()}.npz")


def digits_classifier_shapes() -> dict:
    """The classifier's ``params`` tree as shapes and dtypes: nothing is read, trained or cached."""
    x = jax.ShapeDtypeStruct((1, DIGITS_SIZE, DIGITS_SIZE, 1), jnp.float32)
    return jax.eval_shape(DigitsClassifier().init, jax.random.key(0), x)["params"]


@functools.cache
def _params_at(path: str) -> dict:
    if not os.path.isfile(path):
        save_tree_npz(_train(_RECIPE), path)
    return load_tree_npz(path, expected=digits_classifier_shapes(), what="digits classifier weights")


def digits_classifier_params(*, cache_dir: str | os.PathLike | None = None) -> dict:
    """The trained digits classifier's parameters: read from the cache, or trained and cached.

    Args:
      cache_dir: where ``digits_classifier_<hash>.npz`` lives; defaults to ``$DIFFAX_CACHE_DIR``
        or ``~/.cache/diffax``.

    Returns:
      The Flax ``params`` tree of :class:`DigitsClassifier`.
    """
    return _params_at(_cache_path(cache_dir))


@jax.jit
def _apply(params, images):
    return DigitsClassifier().apply({"params": params}, _to_8x8(images))


def digits_features_and_logits(
    images: ArrayLike, *, params: Mapping | None = None
) -> tuple[jax.Array, jax.Array]:
    """Penultimate features and logits of the digits classifier.

    Args:
      images: (N, 8k, 8k) or (N, 8k, 8k, 1) digits in [-1, 1] (white strokes on black, as
        ``diffax.data`` yields them), for an integer upsampling factor k; k×k blocks are averaged
        back to 8×8 first.
      params: classifier parameters; defaults to :func:`digits_classifier_params`.

    Returns:
      ``(features, logits)`` of shapes (N, 64) and (N, 10).
    """
    return _apply(digits_classifier_params() if params is None else params, images)
