"""Pallas splash attention (TPU): block-sparse flash attention over packed rows.

The kernel takes the mask as what it is, causality plus segment ids, and skips the key blocks it
rules out, so the dense [B, 1, L, L] mask is never built. Off TPU the Pallas interpreter runs it
(same numerics, slowly: tests). Decoding with a KV cache attends one query to a dense cache mask,
not splash's shape, so the `fn` registered for that path is XLA's attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from lm.model.attention import register_kernel, xla_attention
from lm.runtime.mesh import logical_to_spec

# Preferred tile lengths on TPU (queries, keys); a sequence takes the largest tile that divides it.
_BLOCK_Q, _BLOCK_KV = 512, 1024
_LANES = splash.NUM_LANES  # every tile is a multiple of the 128-lane vreg width


def _tile(length: int, preferred: int) -> int:
    """The largest of preferred, preferred/2, ..., 128 dividing `length`."""
    if length % _LANES:
        raise ValueError(
            f"splash attention needs a sequence length divisible by {_LANES}: {length}"
        )
    tile = preferred
    while length % tile:
        tile //= 2
    return tile


def block_sizes(length: int) -> splash.BlockSizes:
    """Forward and backward tiles for sequences of `length` (one fused backward kernel)."""
    bq, bkv = _tile(length, _BLOCK_Q), _tile(length, _BLOCK_KV)
    bkv_compute = min(bq, bkv)
    return splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv_compute,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv_compute,
        use_fused_bwd_kernel=True,
    )


def _kernel(heads: int, length: int, causal: bool, interpret: bool) -> splash.SplashAttentionKernel:
    """One example's kernel: q [H, L, K], k and v [G, L, K], segment ids [L] -> [H, L, K].

    Not cached: it holds its block-sparsity tables as arrays, which belong to the trace that
    made them.
    """
    shape = (length, length)
    head_mask = masks.CausalMask(shape) if causal else masks.FullMask(shape)
    return splash.make_splash_mha(
        masks.MultiHeadMask([head_mask] * heads),
        block_sizes=block_sizes(length),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _local_attention(
    q_BxLxHxK: jax.Array,
    k_BxLxGxK: jax.Array,
    v_BxLxGxK: jax.Array,
    segment_ids_BxL: jax.Array,
    causal: bool,
) -> jax.Array:
    """`splash_attention` on one device's rows and heads."""
    _, length, heads, head_dim = q_BxLxHxK.shape
    kernel = _kernel(heads, length, causal, jax.default_backend() != "tpu")
    # Splash does not scale the scores: scale the queries (in f32, like the other kernels).
    scale = 1.0 / head_dim**0.5
    q_BxHxLxK = (
        (q_BxLxHxK.astype(jnp.float32) * scale).astype(q_BxLxHxK.dtype).transpose(0, 2, 1, 3)
    )
    k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3)
    segments = splash.SegmentIds(q=segment_ids_BxL, kv=segment_ids_BxL)
    out_BxHxLxK = jax.vmap(kernel)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, segments)
    return out_BxHxLxK.transpose(0, 2, 1, 3)


def splash_attention(
    q_BxLxHxK: jax.Array,
    k_BxLxGxK: jax.Array,
    v_BxLxGxK: jax.Array,
    segment_ids_BxL: jax.Array,
    causal: bool,
) -> jax.Array:
    """Self-attention over packed rows: query i attends key j of its own segment (j <= i if
    `causal`), softmax(QKᵀ/√d_k)V with G key/value heads shared by H query heads."""
    local = functools.partial(_local_attention, causal=causal)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    # XLA cannot partition a Pallas call (it would gather every input onto every device), so
    # each device runs the kernel on its own rows and heads. Heads split only where the key/value
    # heads do, so each device's query heads find their shared key/value heads locally.
    kv_spec = logical_to_spec(
        ("act_batch", "act_length", "act_heads", None), k_BxLxGxK.shape, dict(mesh.shape)
    )
    segments_spec = PartitionSpec(*kv_spec[:2])
    return jax.shard_map(
        local,
        in_specs=(kv_spec, kv_spec, kv_spec, segments_spec),
        out_specs=kv_spec,
        check_vma=False,  # splash's pallas_call outputs declare no varying mesh axes
    )(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)


register_kernel("splash", heads_major=False, packed=splash_attention)(xla_attention)
