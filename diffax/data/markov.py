"""A synthetic order-k Markov source over ``V`` symbols whose entropy rate is known exactly.

Each context of the last ``k`` symbols has its own next-symbol distribution, drawn once from a
symmetric Dirichlet by the seed. Sequences start in the stationary distribution of the chain on
k-grams, so the process is stationary and ``H(X_1..X_L) = H(X_1..X_k) + (L − k) h`` exactly, with ``h``
the entropy rate (Cover & Thomas, "Elements of Information Theory", Thm. 4.2.4).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MarkovSource:
    """An order-``k`` Markov chain over ``V`` symbols.

    Attributes:
      transitions: float64 ``(V**k, V)``: ``p(next | context)``, the context read as a base-``V``
        number, most recent symbol last.
      stationary: float64 ``(V**k,)``: the stationary distribution of the k-gram chain.
      vocab_size: ``V``.
      order: ``k`` (at least 1).
    """

    transitions: np.ndarray
    stationary: np.ndarray
    vocab_size: int
    order: int

    def entropy_rate(self) -> float:
        """``h = Σ_c π(c) H(p(· | c))`` in nats per symbol."""
        p = self.transitions
        return float(-np.sum(self.stationary[:, None] * p * np.log(np.where(p > 0, p, 1.0))))

    def block_entropy(self, length: int) -> float:
        """``H(X_1, .., X_L)`` in nats for ``L ≥ k``: ``H(π) + (L − k) h``."""
        if length < self.order:
            raise ValueError(f"length={length} must be at least the order {self.order}.")
        pi = self.stationary
        return (
            float(-np.sum(pi * np.log(np.where(pi > 0, pi, 1.0))))
            + (length - self.order) * self.entropy_rate()
        )

    def _contexts(self, sequences: np.ndarray) -> np.ndarray:
        """The base-``V`` context index before each position ``k .. L−1``: ``(N, L − k)``."""
        n, length = sequences.shape
        index = np.zeros((n, length - self.order + 1), np.int64)
        for j in range(self.order):
            index = index * self.vocab_size + sequences[:, j : length - self.order + 1 + j]
        return index

    def log_prob(self, sequences: np.ndarray) -> np.ndarray:
        """``log p(x)`` of int sequences ``(N, L)`` with ``L ≥ k``, float64 ``(N,)``."""
        sequences = np.asarray(sequences, np.int64)
        contexts = self._contexts(sequences)
        first = np.log(self.stationary[contexts[:, 0]])
        steps = np.log(self.transitions[contexts[:, :-1], sequences[:, self.order :]])
        return first + steps.sum(axis=1)

    def sample(self, rng: np.random.Generator, num: int, length: int) -> np.ndarray:
        """Draws ``num`` stationary sequences of ``length`` symbols, int32 ``(num, length)``."""
        v, k = self.vocab_size, self.order
        start = rng.choice(len(self.stationary), size=num, p=self.stationary)
        out = np.zeros((num, length), np.int64)
        for j in range(k):
            out[:, k - 1 - j] = start // v**j % v
        context = start
        cumulative = np.cumsum(self.transitions, axis=1)
        for i in range(k, length):
            u = rng.random(num)[:, None]
            nxt = np.minimum((u > cumulative[context]).sum(axis=1), v - 1)
            out[:, i] = nxt
            context = context % v ** (k - 1) * v + nxt
        return out[:, :length].astype(np.int32)


def markov_source(*, vocab_size: int, order: int, seed: int, concentration: float = 0.5) -> MarkovSource:
    """Builds the source: Dirichlet(``concentration``) next-symbol rows from ``seed``, and its stationary law.

    Args:
      vocab_size: ``V`` (at least 2).
      order: ``k`` (at least 1).
      seed: the only source of randomness.
      concentration: Dirichlet parameter; smaller gives more predictable (lower-entropy) rows.
    """
    if vocab_size < 2 or order < 1:
        raise ValueError(f"markov_source: vocab_size={vocab_size} must be >= 2 and order={order} >= 1.")
    rng = np.random.default_rng([seed, 0x6D61726B])
    v, k = vocab_size, order
    transitions = rng.dirichlet(np.full(v, concentration), size=v**k)
    transitions = np.maximum(transitions, 1e-6)
    transitions /= transitions.sum(axis=1, keepdims=True)
    chain = np.zeros((v**k, v**k))
    for c in range(v**k):
        chain[c, c % v ** (k - 1) * v + np.arange(v)] = transitions[c]
    values, vectors = np.linalg.eig(chain.T)
    pi = np.abs(np.real(vectors[:, np.argmin(np.abs(values - 1.0))]))
    return MarkovSource(transitions=transitions, stationary=pi / pi.sum(), vocab_size=v, order=k)


__all__ = ["MarkovSource", "markov_source"]
