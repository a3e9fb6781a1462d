"""FLOP accounting for MFU: model FLOPs per token and the device's peak FLOP/s.

Training FLOPs per token (PaLM, appendix B; Chinchilla's approximation):
    6 * N_matmul + 12 * n_layers * seq_len * d_model
where N_matmul counts every weight used in a matrix multiply (attention and MLP projections
and the output head, but not the embedding lookup, norms or biases); the factor 6 is 2 for the
forward multiply-add and 4 for the backward pass. The second term is the attention scores and
weighted sum (QKᵀ and AV), counted over the full L×L square as is conventional, although a
causal mask could skip half of it. Evaluation-only passes cost a third of this.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from lm.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor datasheets); f32 matmuls run through the same units.
_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 125e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in matrix multiplies, per token (the head counts even when tied)."""
    d, k = cfg.d_model, cfg.head_dim
    attn = d * k * (cfg.num_heads * 2 + cfg.kv_heads * 2)
    mlp = d * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward), per the formula above."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * seq_len * cfg.d_model


def decode_flops_per_token(cfg: ModelConfig, slots: int) -> float:
    """Model FLOPs of one decoded token attending to a full cache of `slots` positions."""
    return 2.0 * matmul_params(cfg) + 4.0 * cfg.num_layers * slots * cfg.num_heads * cfg.head_dim


def peak_flops(devices: list[jax.Device]) -> float:
    """Peak FLOP/s of `devices` together: datasheet × count for accelerators; for CPUs a measured
    matmul peak per process, since a process's emulated CPU devices share the same cores."""
    kind = devices[0].device_kind
    for name, flops in _PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops * len(devices)
    return measure_matmul_flops(devices[0]) * jax.process_count()


def measure_matmul_flops(device: jax.Device, n: int = 1024, repeats: int = 20) -> float:
    """Best observed f32 matmul FLOP/s on `device` (the practical peak of a CPU); on a shared
    machine fewer repeats read it 5% lower, and MFU that much higher."""
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best
