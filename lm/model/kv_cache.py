"""A preallocated key/value cache for incremental decoding, one slot per token position.

Keys and values of every layer live in two arrays [layers, batch, slots, kv_heads, head_dim]
(kv_heads = the GQA key/value heads, not the query heads). Rows of a batch are left-padded to a
common length, so every row writes its next token into the same slot; a row's own positions
start after its padding. Shapes are static, so one compiled decode step serves every step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.parallel import constrain

# The cache's batch axis follows the activations' batch sharding, its kv-head axis the heads'.
CACHE_AXES = ("layers", "act_batch", "act_length", "act_heads", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of all layers, [N, B, S, G, K] each."""

    k_NxBxSxGxK: jax.Array
    v_NxBxSxGxK: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int) -> KVCache:
        shape = (cfg.num_layers, batch, slots, cfg.kv_heads, cfg.head_dim)
        zeros = constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), CACHE_AXES)
        return cls(zeros, zeros)

    @property
    def slots(self) -> int:
        return self.k_NxBxSxGxK.shape[2]

    def update(
        self, layer: int | jax.Array, start: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array
    ) -> tuple[KVCache, jax.Array, jax.Array]:
        """Write L keys/values of `layer` at slots start..start+L-1; return that layer's cache."""
        at = (layer, 0, start, 0, 0)
        k = jax.lax.dynamic_update_slice(self.k_NxBxSxGxK, k_BxLxGxK[None].astype(self.dtype), at)
        v = jax.lax.dynamic_update_slice(self.v_NxBxSxGxK, v_BxLxGxK[None].astype(self.dtype), at)
        cache = KVCache(constrain(k, CACHE_AXES), constrain(v, CACHE_AXES))
        return cache, cache.k_NxBxSxGxK[layer], cache.v_NxBxSxGxK[layer]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k_NxBxSxGxK.dtype

    def select_rows(self, rows_B: jax.Array) -> KVCache:
        """The cache of batch rows `rows_B` (beam search reorders beams with it)."""
        return KVCache(
            constrain(jnp.take(self.k_NxBxSxGxK, rows_B, axis=1), CACHE_AXES),
            constrain(jnp.take(self.v_NxBxSxGxK, rows_B, axis=1), CACHE_AXES),
        )


def decode_mask(pads_B: jax.Array, start: jax.Array, length: int, slots: int) -> jax.Array:
    """Boolean [B, 1, L, S]: the query at slot start+i sees slots from the row's first real token
    (after its `pads_B` left-padding slots) up to itself."""
    query_L = start + jnp.arange(length)
    slot_S = jnp.arange(slots)
    causal_LxS = slot_S[None, :] <= query_L[:, None]
    real_BxS = slot_S[None, :] >= pads_B[:, None]
    return (causal_LxS[None] & real_BxS[:, None, :])[:, None]
