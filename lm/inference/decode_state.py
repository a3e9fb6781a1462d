"""The state one decode step reads and replaces: KV cache, next-token logits, row bookkeeping."""

from __future__ import annotations

import dataclasses

import jax

from lm.model.kv_cache import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything one decode step reads and replaces (donated between steps)."""

    cache: KVCache
    logits_BxV: jax.Array  # next-token logits of every row
    seen_BxV: jax.Array  # tokens in the prompt or generated so far (repetition penalty)
    done_B: jax.Array  # row produced EOS
    key: jax.Array
