"""Platform profiles: how each backend computes best, for the config values left `auto`.

A profile changes how XLA computes a step, never what it computes: the attention kernel
(`model.attention=auto`), the vocabulary tiling of the LM loss (`train.loss_chunk=-1`) and how
the vocabulary projection's weight gradient is formed (`per_platform`, chosen at lowering).
Configs and models keep `auto`, so a run trained on a TPU still runs on a CPU: each attention
call picks its kernel for its rows' length (`attention_kernel`; splash needs 128-token lanes,
so single-token decoding falls back), and the loss tiling is picked where a loss is built
(`for_platform`; `lm plan --topology` passes the slice's platform). The CPU's host allocator
is set before JAX starts, so it lives apart (`lm.runtime.host_memory`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from lm.config import Config


@dataclasses.dataclass(frozen=True)
class Profile:
    attention: str  # the kernel `model.attention=auto` becomes
    loss_chunk: int  # tokens per tile of the LM loss for `train.loss_chunk=-1`; 0 = untiled
    # `lm.model.linear.dense_transposed` forms its weight gradient from a materialised xᵀ
    transposed_weight_grad: bool


PROFILES = {
    # XLA:CPU runs explicit einsums faster than its fused attention, and its GEMMs are
    # compute-bound already, so tiling the vocabulary only adds loop overhead. It hands
    # YNNPACK only GEMMs whose left operand is not transposed: the head's weight gradient gᵀx
    # would run in Eigen, beside YNNPACK's input gradient and slower than both in YNNPACK.
    "cpu": Profile(attention="math", loss_chunk=0, transposed_weight_grad=True),
    # cuDNN's flash attention and a tiled loss keep [B, H, L, L] scores and [B, L, V] logits
    # out of HBM.
    "gpu": Profile(attention="cudnn", loss_chunk=512, transposed_weight_grad=False),
    # Splash attention skips masked blocks and never materialises the mask.
    "tpu": Profile(attention="splash", loss_chunk=512, transposed_weight_grad=False),
}

# `jax.lax.platform_dependent`'s names for the accelerators of PROFILES; any other platform
# takes the CPU's profile, as in `_profile`.
_ACCELERATORS = {"gpu": ("cuda", "rocm"), "tpu": ("tpu",)}

# Splash attention tiles the sequence in 128-token lanes.
_SPLASH_LANES = 128


def _profile(platform: str | None) -> Profile:
    return PROFILES.get(platform or jax.default_backend(), PROFILES["cpu"])


def per_platform(field: str, choices: Mapping[Any, Callable], *args):
    """`choices[profile.<field>](*args)` for the profile of the platform the computation is
    compiled for. Each distinct choice is traced, and the lowering keeps its platform's, so a
    step lowered for a TPU slice on a CPU host (`lm plan --topology`) gets the TPU's."""

    def choice(key: str) -> Callable:
        return choices[getattr(PROFILES[key], field)]

    # Platforms given the same callable share one traced branch.
    branches = {name: choice(key) for key, names in _ACCELERATORS.items() for name in names}
    return jax.lax.platform_dependent(*args, default=choice("cpu"), **branches)


def attention_kernel(name: str, length: int, platform: str | None = None) -> str:
    """The kernel `model.attention=name` runs for rows of `length` tokens on `platform`."""
    if name != "auto":
        return name
    kernel = _profile(platform).attention
    return "xla" if kernel == "splash" and length % _SPLASH_LANES else kernel


def for_platform(cfg: Config, platform: str | None = None) -> Config:
    """`cfg` with its `auto` values chosen for `platform` (default: JAX's default backend)."""
    m, t, length = cfg.model, cfg.train, cfg.data.seq_len
    if m.attention != "auto" and t.loss_chunk >= 0:
        return cfg
    chunk = t.loss_chunk
    if chunk < 0:
        chunk = _profile(platform).loss_chunk
        if not chunk or length % chunk or chunk >= length:
            chunk = 0
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(m, attention=attention_kernel(m.attention, length, platform)),
        train=dataclasses.replace(t, loss_chunk=chunk),
    )
