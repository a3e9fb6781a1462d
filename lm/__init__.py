"""lm: Transformer language models in JAX and Flax NNX, from a laptop CPU to a TPU pod."""

__version__ = "0.1.0"
