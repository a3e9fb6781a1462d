"""Next-token choice on device: CTRL's repetition penalty, temperature, and Hugging Face's
top-k, top-p and min-p filters, as functions of device scalars (changing a setting never
recompiles)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings as device scalars, so changing them never recompiles."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array


def penalize_repeats(logits_BxV: jax.Array, seen_BxV: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL's repetition penalty: seen tokens' logits divided by `penalty` (multiplied if < 0)."""
    penalized = jnp.where(logits_BxV > 0, logits_BxV / penalty, logits_BxV * penalty)
    return jnp.where(seen_BxV, penalized, logits_BxV)


def filter_logits(logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array):
    """Logits with every token outside the top-k, the top-p nucleus or the min-p set at -inf.

    The filters compose as Hugging Face's logits warpers (top-k, then top-p on the top-k's
    renormalized distribution, then min-p). top_k = 0, top_p = 1 and min_p = 0 each disable
    their filter; the most likely token always survives. Ties at a cut-off are kept.
    """
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
    vocab = logits_BxV.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_Bx1 = jnp.take(sorted_BxV, k - 1, axis=-1)[:, None]
    sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Nucleus: a token stays while the mass strictly before it is below top_p.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    last_in_nucleus_B = jnp.sum(mass_before_BxV < top_p, axis=-1) - 1
    nucleus_Bx1 = jnp.take_along_axis(sorted_BxV, last_in_nucleus_B[:, None], axis=-1)
    # min-p: p >= min_p * p_max  <=>  logit >= logit_max + log(min_p).
    min_p_Bx1 = sorted_BxV[:, :1] + jnp.log(jnp.maximum(min_p, 1e-30))
    threshold_Bx1 = jnp.maximum(jnp.maximum(kth_Bx1, nucleus_Bx1), min_p_Bx1)
    threshold_Bx1 = jnp.minimum(threshold_Bx1, sorted_BxV[:, :1])
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def choose_tokens(
    logits_BxV: jax.Array, seen_BxV: jax.Array, sampling: Sampling, key: jax.Array, greedy: bool
) -> jax.Array:
    """Next token of every row: argmax, or a draw from the penalized, tempered, filtered logits."""
    logits_BxV = penalize_repeats(logits_BxV, seen_BxV, sampling.repetition_penalty)
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = filter_logits(
        logits_BxV / sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p
    )
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def token_logprobs(logits_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """Log-probability of each row's token under its (unfiltered) logits."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), tokens_B[:, None], -1)[:, 0]
