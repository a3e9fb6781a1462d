"""Sampling text from a causal model: temperature and top-k over a fixed-size buffer.

The whole decode runs as one jitted `fori_loop` over a static [1, max_len] buffer, so any
prompt and length compile once per buffer size.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from lm.data.tokenizer import BOS_ID, EOS_ID, Tokenizer


@partial(jax.jit, static_argnames=("graphdef", "max_len", "top_k"))
def _decode(graphdef, params, buffer_1xT, start, stop, key, temperature, *, max_len, top_k):
    model = nnx.merge(graphdef, params)

    def body(t, carry):
        buffer, key = carry
        logits_1xTxV = model(buffer)
        logits_V = jax.lax.dynamic_index_in_dim(logits_1xTxV[0], t - 1, keepdims=False)
        if top_k > 0:
            kth = jax.lax.top_k(logits_V, top_k)[0][-1]
            logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
        key, sub = jax.random.split(key)
        sampled = jax.random.categorical(sub, logits_V / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logits_V)).astype(buffer.dtype)
        return buffer.at[0, t].set(token), key

    buffer, _ = jax.lax.fori_loop(start, stop, body, (buffer_1xT, key))
    return buffer


def sample(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    max_len: int,
    temperature: float = 0.8,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """Continue `prompt` (BOS-prefixed) by up to `max_new_tokens`, cut at the first EOS."""
    ids = [BOS_ID, *tokenizer.encode(prompt)]
    if len(ids) >= max_len:
        raise ValueError(
            f"The prompt has {len(ids)} tokens but the model's context is {max_len}; "
            "shorten the prompt."
        )
    stop = min(len(ids) + max_new_tokens, max_len)
    buffer = jnp.zeros((1, max_len), jnp.int32).at[0, : len(ids)].set(jnp.asarray(ids))
    out = _decode(
        graphdef,
        params,
        buffer,
        len(ids),
        stop,
        jax.random.key(seed),
        jnp.float32(temperature),
        max_len=max_len,
        top_k=top_k,
    )
    new = [int(t) for t in jax.device_get(out)[0, len(ids) : stop]]
    if EOS_ID in new:
        new = new[: new.index(EOS_ID)]
    return prompt + tokenizer.decode(new)
