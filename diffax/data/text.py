"""A character corpus that is always present offline, and the token pipelines of text runs.

The corpus is the documentation text of CPython's ``pydoc_data/topics.py`` (the ``topics`` dict's
values in file order; PSF licence), normalised like text8: lowercase, digits spelled out, every
other character a space, runs of spaces squeezed — 27 symbols, space = token 0, ``a..z`` = 1..26.
Its SHA-256 (of the normalised text) is pinned so that numbers cannot move silently with the Python
version. The first 90% of the characters are ``"train"``, the last 10% ``"test"``.

Token pipelines yield ``{"tokens": int32 (local_batch, seq_len)}``: random windows of the split
(text) or fresh draws (Markov source), each batch a pure function of ``(seed, step)``.

References: Mahoney, text8 and ``wikifil.pl`` (the normalisation); Austin et al. 2021 and Sahoo et al.
2024 (text8 experiments).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re

import numpy as np

from diffax.data import markov
from diffax.data.pipeline import _StepDerived

ALPHABET = " abcdefghijklmnopqrstuvwxyz"
TEXT_DATASETS = ("text", "markov")
SPLITS = ("train", "test")
# SHA-256 of the normalised text of pydoc_data/topics.py from CPython 3.11.7.
TOPICS_SHA256 = "ea066a6d4552a30e354498d898281f3b481c0e2acfbd3e6c15af68218530af82"
_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def default_corpus_path() -> str:
    """The running Python's ``pydoc_data/topics.py`` (found without importing it)."""
    return importlib.util.find_spec("pydoc_data.topics").origin


def read_topics(path: str) -> str:
    """The ``topics`` dict's values of a ``topics.py`` in file order, joined by newlines (no code runs)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return "\n".join(ast.literal_eval(node.value).values())
    raise ValueError(f"{path} has no `topics = {{...}}` assignment.")


def normalize_like_text8(text: str) -> str:
    """Lowercase, digits spelled out, everything outside ``a-z`` a space, spaces squeezed and stripped."""
    text = text.lower()
    text = re.sub(r"[0-9]", lambda m: f" {_DIGITS[int(m.group())]} ", text)
    text = re.sub(r"[^a-z]+", " ", text)
    return text.strip()


def encode(text: str) -> np.ndarray:
    """Characters of ``ALPHABET`` → uint8 tokens."""
    table = np.zeros(256, np.uint8)
    for i, ch in enumerate(ALPHABET):
        table[ord(ch)] = i
    return table[np.frombuffer(text.encode("ascii"), np.uint8)]


def decode(tokens: np.ndarray) -> str:
    """Tokens (any int array; values past the alphabet, e.g. a mask, print as ``_``) → text."""
    return "".join(ALPHABET[t] if 0 <= t < len(ALPHABET) else "_" for t in np.asarray(tokens).ravel())


def load_corpus(path: str = "", *, sha256: str = TOPICS_SHA256, split: str = "train") -> np.ndarray:
    """The normalised corpus as uint8 tokens, one split of it (first 90% / last 10% by position).

    Args:
      path: a ``topics.py``; ``""`` is the running Python's.
      sha256: the expected digest of the normalised text.
      split: ``"train"`` or ``"test"``.

    Raises:
      ValueError: one line naming ``config.input.corpus_sha256`` when the digest differs.
    """
    if split not in SPLITS:
        raise ValueError(f"config.input.split: {split!r}; the text corpus has {SPLITS}.")
    path = path or default_corpus_path()
    text = normalize_like_text8(read_topics(path))
    digest = hashlib.sha256(text.encode("ascii")).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"config.input.corpus_sha256: the normalised text of {path} has SHA-256 {digest}, not the pinned"
            f" {sha256}; point config.input.corpus_path at CPython 3.11.7's pydoc_data/topics.py, or set"
            " corpus_sha256 to the new digest (numbers will not compare with the published ones)."
        )
    tokens = encode(text)
    cut = int(0.9 * len(tokens))
    return tokens[:cut] if split == "train" else tokens[cut:]


def bigram_entropy_bits(tokens: np.ndarray, vocab_size: int = len(ALPHABET)) -> float:
    """``H(X_i | X_{i−1})`` of a token stream in bits per character (plug-in estimate)."""
    counts = np.zeros((vocab_size, vocab_size))
    np.add.at(counts, (tokens[:-1], tokens[1:]), 1.0)
    joint = counts / counts.sum()
    cond = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    return float(-np.sum(joint[joint > 0] * np.log2(cond[joint > 0])))


def heldout_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Consecutive non-overlapping windows of ``seq_len`` covering the stream (the remainder dropped)."""
    n = len(tokens) // seq_len
    return np.asarray(tokens[: n * seq_len], np.int32).reshape(n, seq_len)


class WindowPipeline(_StepDerived):
    """Random windows of a token stream: the starts of step ``s``'s global batch come from ``(seed, s)``."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, **shard):
        super().__init__(**shard)
        if len(tokens) <= seq_len:
            raise ValueError(
                f"config.input.seq_len: {seq_len} must be shorter than the corpus ({len(tokens)})."
            )
        self.tokens, self.seq_len = tokens, seq_len

    def get(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, 0x74657874])
        starts = rng.integers(0, len(self.tokens) - self.seq_len + 1, size=self.global_batch)[
            self.local_slice
        ]
        return {"tokens": self.tokens[starts[:, None] + np.arange(self.seq_len)].astype(np.int32)}


class MarkovPipeline(_StepDerived):
    """Fresh stationary sequences of the Markov source, drawn for the global batch from ``(seed, step)``."""

    def __init__(self, source: markov.MarkovSource, *, seq_len: int, **shard):
        super().__init__(**shard)
        self.source, self.seq_len = source, seq_len

    def get(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, 0x6D6B76])
        return {"tokens": self.source.sample(rng, self.global_batch, self.seq_len)[self.local_slice]}


def markov_from_config(input_config) -> markov.MarkovSource:
    """The Markov source of ``config.input`` (``markov_vocab``, ``markov_order``, ``markov_seed``)."""
    c = input_config
    return markov.markov_source(vocab_size=c.markov_vocab, order=c.markov_order, seed=c.markov_seed)


def vocab_size(input_config) -> int:
    """Data tokens of a text input: 27 for the corpus, ``markov_vocab`` for the Markov source."""
    return len(ALPHABET) if input_config.dataset == "text" else input_config.markov_vocab


def make_token_pipeline(input_config, *, split: str | None = None, **shard) -> _StepDerived:
    """The pipeline of a text input (``config.input.dataset`` in ``TEXT_DATASETS``)."""
    c = input_config
    if c.dataset == "text":
        tokens = load_corpus(c.corpus_path, sha256=c.corpus_sha256, split=split or c.split)
        return WindowPipeline(tokens, seq_len=c.seq_len, **shard)
    return MarkovPipeline(markov_from_config(c), seq_len=c.seq_len, **shard)


__all__ = [
    "ALPHABET",
    "SPLITS",
    "TEXT_DATASETS",
    "TOPICS_SHA256",
    "MarkovPipeline",
    "WindowPipeline",
    "bigram_entropy_bits",
    "decode",
    "default_corpus_path",
    "encode",
    "heldout_windows",
    "load_corpus",
    "make_token_pipeline",
    "markov_from_config",
    "normalize_like_text8",
    "read_topics",
    "vocab_size",
]
