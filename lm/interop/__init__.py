"""Hugging Face interop: GPT-2, Llama and BERT weights in safetensors, both directions."""

from lm.interop.convert import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
