"""Evaluation: Fréchet distance, Inception Score, KID, precision/recall, streaming statistics."""

from diffax.evaluation._frechet import frechet_distance

__all__ = ["frechet_distance"]
