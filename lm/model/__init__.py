"""Flax NNX model modules."""

from lm.model.transformer import Transformer

__all__ = ["Transformer"]
