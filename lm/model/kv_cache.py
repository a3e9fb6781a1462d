"""A preallocated key/value cache for incremental decoding, one slot per token position.

Keys and values are stored heads-major, [batch, kv_heads, slots, head_dim] per layer (kv_heads =
the GQA key/value heads, not the query heads): the layout the attention GEMMs read, so a decode
step attends to a layer's cache in place. Unrolled layers keep one array per layer: a layer of a
stacked [layers, ...] array is a slice that XLA:CPU copies before every GEMM, which copied the
whole cache every step (measured: batch-8 decode 1.4x slower). Scanned layers index the cache
with a traced layer number, so they keep one stacked array (and its per-layer copy).

Rows of a batch are left-padded to a common length, so every row writes its next token into the
same slot; a row's own positions start after its padding. The cache records that padding and how
many slots are filled, so a forward pass over the next tokens needs nothing else. Shapes are
static, so one compiled decode step serves every step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.runtime.mesh import constrain

# A layer's batch axis follows the activations' batch sharding, its kv-head axis the heads'.
LAYER_AXES = ("act_batch", "act_heads", "act_length", None)
STACKED_AXES = ("layers", *LAYER_AXES)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values (one [B, G, S, K] array per layer, or for scanned layers a single stacked
    [N, B, G, S, K] array), each row's left padding, and how many slots are filled."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    pads_B: jax.Array  # padding slots before each row's first real token
    length: jax.Array  # slots filled: the next token of every row goes to this slot

    @classmethod
    def zeros(cls, cfg: ModelConfig, pads_B: jax.Array, slots: int) -> KVCache:
        """An empty cache of `slots` slots for rows left-padded by `pads_B` slots."""
        shape = (pads_B.shape[0], cfg.kv_heads, slots, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        if cfg.scan_layers:
            arrays = (constrain(jnp.zeros((cfg.num_layers, *shape), dtype), STACKED_AXES),)
        else:
            arrays = tuple(
                constrain(jnp.zeros(shape, dtype), LAYER_AXES) for _ in range(cfg.num_layers)
            )
        return cls(arrays, arrays, jnp.asarray(pads_B, jnp.int32), jnp.int32(0))

    @property
    def stacked(self) -> bool:
        return self.k[0].ndim == 5

    @property
    def slots(self) -> int:
        return self.k[0].shape[-2]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k[0].dtype

    def positions(self, length: int) -> jax.Array:
        """[B, L] positions of the next L tokens: a row's count from its first real token."""
        slot_L = self.length + jnp.arange(length)
        return jnp.maximum(slot_L[None] - self.pads_B[:, None], 0)

    def mask(self, length: int) -> jax.Array:
        """Boolean [B, 1, L, S]: the next L tokens' queries see slots from the row's first real
        token up to their own."""
        query_L = self.length + jnp.arange(length)
        slot_S = jnp.arange(self.slots)
        causal_LxS = slot_S[None, :] <= query_L[:, None]
        real_BxS = slot_S[None, :] >= self.pads_B[:, None]
        return (causal_LxS[None] & real_BxS[:, None, :])[:, None]

    def update(
        self, layer: int | jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array
    ) -> tuple[KVCache, jax.Array, jax.Array]:
        """Write L keys/values of `layer` at the next L slots; return the cache and that layer's
        keys and values [B, G, S, K]. `length` is unchanged until `advance`."""
        start = self.length
        if self.stacked:
            at = (layer, 0, 0, start, 0)

            def write(cache_NxBxGxSxK, x_BxLxGxK):
                x_1xBxGxLxK = x_BxLxGxK.transpose(0, 2, 1, 3)[None].astype(self.dtype)
                updated = jax.lax.dynamic_update_slice(cache_NxBxGxSxK, x_1xBxGxLxK, at)
                return (constrain(updated, STACKED_AXES),)

            cache = dataclasses.replace(
                self, k=write(self.k[0], k_BxLxGxK), v=write(self.v[0], v_BxLxGxK)
            )
            return cache, cache.k[0][layer], cache.v[0][layer]

        def write_layer(layers, x_BxLxGxK):
            x_BxGxLxK = x_BxLxGxK.transpose(0, 2, 1, 3).astype(self.dtype)
            updated = jax.lax.dynamic_update_slice(layers[layer], x_BxGxLxK, (0, 0, start, 0))
            return (*layers[:layer], constrain(updated, LAYER_AXES), *layers[layer + 1 :])

        cache = dataclasses.replace(
            self, k=write_layer(self.k, k_BxLxGxK), v=write_layer(self.v, v_BxLxGxK)
        )
        return cache, cache.k[layer], cache.v[layer]

    def advance(self, length: int) -> KVCache:
        """The cache after `length` more tokens of every row were written."""
        return dataclasses.replace(self, length=self.length + length)

    def select_rows(self, rows_B: jax.Array) -> KVCache:
        """The cache of batch rows `rows_B` (beam search reorders beams with it)."""
        axes = STACKED_AXES if self.stacked else LAYER_AXES
        axis = 1 if self.stacked else 0

        def take(arrays):
            return tuple(constrain(jnp.take(a, rows_B, axis=axis), axes) for a in arrays)

        return dataclasses.replace(self, k=take(self.k), v=take(self.v), pads_B=self.pads_B[rows_B])


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """A `KVCache` as one layer of a forward pass over its next L tokens sees it: the layer's
    index (traced under scanned layers) and the [B, 1, L, S] mask of the slots each token sees
    (computed once per pass)."""

    cache: KVCache
    layer: int | jax.Array
    mask_Bx1xLxS: jax.Array

    def update(
        self, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array
    ) -> tuple[LayerCache, jax.Array, jax.Array]:
        """Write this layer's L keys/values; return the view and the layer's keys and values
        [B, G, S, K]."""
        cache, k_BxGxSxK, v_BxGxSxK = self.cache.update(self.layer, k_BxLxGxK, v_BxLxGxK)
        return dataclasses.replace(self, cache=cache), k_BxGxSxK, v_BxGxSxK
