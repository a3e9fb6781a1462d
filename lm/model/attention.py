"""Multi-head self-attention: softmax(QKᵀ/√d_k)V per head, heads concatenated and projected by W_O.

Grouped-query attention shares each key/value head across `num_heads / num_kv_heads` query
heads. Rotary position embeddings (RoPE) rotate queries and keys by their positions. The mask
combines causality with `segment_ids`, so documents packed into one row never see each other.
With a KV cache (generation), new tokens instead attend to the cached ones. The attention
itself is a kernel chosen by name (`ModelConfig.attention`) from `KERNELS`; a new one is a
function registered with `register_kernel`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ModelConfig
from lm.model.kv_cache import LayerCache
from lm.model.linear import dense
from lm.model.params import param
from lm.runtime.mesh import constrain
from lm.runtime.platforms import attention_kernel

_NEG_INF = -1e30  # large finite negative: exp() underflows to 0 without producing NaN rows


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """float32 [K/2] frequencies theta^(-2i/K), rescaled per `cfg.rope_scaling` as in HF Llama."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / factor
    elif cfg.rope_scaling == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between the
        # two cutoffs interpolated smoothly (Llama 3.1's rope_scaling).
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        smooth = np.clip((cfg.rope_original_max_len / wavelen - low) / (high - low), 0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq.astype(np.float32)


def rope(
    x_BxLxHxK: jax.Array,
    positions_BxL: jax.Array,
    theta: float,
    inv_freq_K2: np.ndarray | None = None,
) -> jax.Array:
    """Rotate channel pairs (i, i + K/2) by angle position * theta^(-2i/K) (rotate-half form).

    `inv_freq_K2` replaces the frequencies theta^(-2i/K), e.g. by scaled ones from `rope_inv_freq`.
    """
    half = x_BxLxHxK.shape[-1] // 2
    if inv_freq_K2 is None:
        inv_freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLx1xK2 = (positions_BxL[..., None].astype(jnp.float32) * inv_freq_K2)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxK.dtype)


def attention_mask(segment_ids_BxL: jax.Array, causal: bool) -> jax.Array:
    """Boolean [B, 1, L, L] mask: query i may attend key j (same segment, and j <= i if causal)."""
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    if causal:
        length = segment_ids_BxL.shape[1]
        same_BxLxL &= jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    return same_BxLxL[:, None]


class Kernel(NamedTuple):
    """An attention implementation: out [B, L, H, K] = fn(q [B, L, H, K], k, v, mask [B, 1, L, S]).

    Keys and values arrive in the layout the kernel reads without a copy: heads-major [B, G, S, K]
    when `heads_major`, else sequence-major [B, S, G, K]. A kernel that masks from segment ids
    itself also has `packed`, out = packed(q, k [B, L, G, K], v, segment_ids [B, L], causal),
    which self-attention without a cache calls instead, never building the dense mask. One
    that masks by sequence length has `prefix`, out = prefix(q, k [B, L, G, K], v, lengths [B],
    causal), called for rows that each hold one sequence from position 0 and then padding.
    """

    fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
    heads_major: bool
    packed: Callable[[jax.Array, jax.Array, jax.Array, jax.Array, bool], jax.Array] | None = None
    prefix: Callable[[jax.Array, jax.Array, jax.Array, jax.Array, bool], jax.Array] | None = None


# `ModelConfig.attention` names one of these.
KERNELS: dict[str, Kernel] = {}


def register_kernel(
    name: str,
    *,
    heads_major: bool,
    packed: Callable | None = None,
    prefix: Callable | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: make the decorated function the attention kernel called `name`."""

    def register(fn):
        KERNELS[name] = Kernel(fn, heads_major, packed, prefix)
        return fn

    return register


def by_length(implementation: str) -> Callable:
    """`Kernel.prefix` of `jax.nn.dot_product_attention`'s `implementation`: masks from each
    row's length and the causal flag, so cuDNN gets its own mask type (causal, padding) instead
    of a dense [B, 1, L, L] bias it must read."""

    def prefix(
        q_BxLxHxK: jax.Array,
        k_BxLxGxK: jax.Array,
        v_BxLxGxK: jax.Array,
        lengths_B: jax.Array,
        causal: bool,
    ) -> jax.Array:
        out_BxLxHxK = jax.nn.dot_product_attention(
            q_BxLxHxK,
            k_BxLxGxK,
            v_BxLxGxK,
            is_causal=causal,
            query_seq_lengths=lengths_B,
            key_value_seq_lengths=lengths_B,
            implementation=implementation,
        )
        # Padding queries are zeros whatever the kernel leaves there: the weight gradients sum
        # over every position, so a non-finite padding row would reach them as NaN * 0.
        real_BxL = jnp.arange(q_BxLxHxK.shape[1])[None, :] < lengths_B[:, None]
        return jnp.where(real_BxL[:, :, None, None], out_BxLxHxK, 0)

    return prefix


@register_kernel("xla", heads_major=False, prefix=by_length("xla"))
def xla_attention(
    q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask_Bx1xLxS: jax.Array
) -> jax.Array:
    """`jax.nn.dot_product_attention`'s XLA implementation."""
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_Bx1xLxS, implementation="xla"
    )


# JAX's public API gives cuDNN no segment ids: packed rows still reach it with a dense mask.
@register_kernel("cudnn", heads_major=False, prefix=by_length("cudnn"))
def cudnn_attention(
    q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask_Bx1xLxS: jax.Array
) -> jax.Array:
    """cuDNN's fused attention (NVIDIA GPUs only)."""
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_Bx1xLxS, implementation="cudnn"
    )


# Query rows per block when the math kernel skips causally masked blocks (see math_packed).
_CAUSAL_BLOCK = 128


def math_packed(
    q_BxLxHxK: jax.Array,
    k_BxLxGxK: jax.Array,
    v_BxLxGxK: jax.Array,
    segment_ids_BxL: jax.Array,
    causal: bool,
) -> jax.Array:
    """`math_attention` for self-attention that, when causal, skips the key blocks no query of
    a block may see: queries [iC, (i+1)C) attend only to keys [0, (i+1)C), so a sequence of
    n blocks computes (n+1)/2n of the scores (3/4 for two blocks). Each block is the same
    softmax over the same unmasked scores; only the masked ones, exact zeros, are left out."""
    length = q_BxLxHxK.shape[1]
    mask_Bx1xLxL = attention_mask(segment_ids_BxL, causal)
    k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3)
    if not causal or length % _CAUSAL_BLOCK or length < 2 * _CAUSAL_BLOCK:
        return math_attention(q_BxLxHxK, k_BxGxLxK, v_BxGxLxK, mask_Bx1xLxL)
    outs = []
    for start in range(0, length, _CAUSAL_BLOCK):
        end = start + _CAUSAL_BLOCK
        outs.append(
            math_attention(
                q_BxLxHxK[:, start:end],
                k_BxGxLxK[:, :, :end],
                v_BxGxLxK[:, :, :end],
                mask_Bx1xLxL[:, :, start:end, :end],
            )
        )
    return jnp.concatenate(outs, axis=1)


@register_kernel("math", heads_major=True, packed=math_packed)
def math_attention(
    q_BxLxHxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array, mask_Bx1xLxS: jax.Array
) -> jax.Array:
    """Explicit einsums on heads-major keys and values."""
    batch, length, heads, head_dim = q_BxLxHxK.shape
    groups = k_BxGxSxK.shape[1]
    rep = heads // groups
    # Heads-major layout, with the R query heads that share a key/value head stacked as extra
    # query rows (Q = R*L): each product is then one contiguous 4-D batched GEMM, ~30% faster
    # on CPU than sequence-major einsums.
    q_BxGxQxK = (
        q_BxLxHxK.reshape(batch, length, groups, rep, head_dim)
        .transpose(0, 2, 3, 1, 4)
        .reshape(batch, groups, rep * length, head_dim)
    )
    scores_BxGxQxS = jnp.einsum(
        "bgqk,bgsk->bgqs", q_BxGxQxK, k_BxGxSxK, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(head_dim))
    mask_Bx1xQxS = jnp.tile(mask_Bx1xLxS, (1, 1, rep, 1))
    scores_BxGxQxS = jnp.where(mask_Bx1xQxS, scores_BxGxQxS, _NEG_INF)
    probs_BxGxQxS = jax.nn.softmax(scores_BxGxQxS, axis=-1).astype(v_BxGxSxK.dtype)
    out_BxGxQxK = jnp.einsum("bgqs,bgsk->bgqk", probs_BxGxQxS, v_BxGxSxK)
    return (
        out_BxGxQxK.reshape(batch, groups, rep, length, head_dim)
        .transpose(0, 3, 1, 2, 4)
        .reshape(batch, length, heads, head_dim)
    )


def _heads_split() -> bool:
    """Whether the mesh in use splits attention heads (a 'tensor' axis longer than 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and dict(mesh.shape).get("tensor", 1) > 1


def dot_product_attention(
    q_BxLxHxK: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask_Bx1xLxS: jax.Array,
    implementation: str,
    *,
    heads_major: bool = False,
) -> jax.Array:
    """softmax(QKᵀ/√d_k)V with G key/value heads shared by H query heads, by the kernel named
    `implementation`; keys and values are [B, G, S, K] if `heads_major` (a `KVCache`'s layout),
    else [B, S, G, K]."""
    kernel = KERNELS[implementation]
    if kernel.heads_major != heads_major:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return kernel.fn(q_BxLxHxK, k, v, mask_Bx1xLxS)


class Attention(nnx.Module):
    """Multi-head (or grouped-query) self-attention with optional RoPE."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, g, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
        init = nnx.initializers.normal(cfg.init_std)
        # Output projections start smaller so the residual stream's variance does not grow
        # with depth (GPT-2's 1/sqrt(2 * layers) scaling).
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        pdt = jnp.dtype(cfg.param_dtype)
        # Projections are stored per head: [D, H, K] in (one input axis, two output axes),
        # [H, K, D] out (two input axes, one output axis), as their LoRA role says.
        self.wq = param(
            init(rngs.params(), (d, h, k), pdt),
            ("embed", "heads", "kv"),
            decay=True,
            group="block",
            lora=(1, 2),
        )
        self.wk = param(
            init(rngs.params(), (d, g, k), pdt),
            ("embed", "kv_heads", "kv"),
            decay=True,
            group="block",
            lora=(1, 2),
        )
        self.wv = param(
            init(rngs.params(), (d, g, k), pdt),
            ("embed", "kv_heads", "kv"),
            decay=True,
            group="block",
            lora=(1, 2),
        )
        self.wo = param(
            out_init(rngs.params(), (h, k, d), pdt),
            ("heads", "kv", "embed"),
            decay=True,
            group="block",
            lora=(2, 1),
        )
        if cfg.bias:
            bias = functools.partial(param, decay=False, group="block")
            self.bq = bias(jnp.zeros((h, k), pdt), ("heads", "kv"))
            self.bk = bias(jnp.zeros((g, k), pdt), ("kv_heads", "kv"))
            self.bv = bias(jnp.zeros((g, k), pdt), ("kv_heads", "kv"))
            self.bo = bias(jnp.zeros((d,), pdt), ("embed",))

    def _qkv(
        self, x_BxLxD: jax.Array, positions_BxL: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B,L,H,K], keys and values [B,L,G,K], rotated by position under RoPE."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        h, g = cfg.num_heads, cfg.kv_heads
        weights = [self.wq[...], self.wk[...], self.wv[...]]
        biases = [self.bq[...], self.bk[...], self.bv[...]] if cfg.bias else None
        if _heads_split():
            # Each projection keeps its own heads' shards: concatenated, the shards of Q, K and
            # V would have to move between devices in every layer.
            q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = (dense(x_BxLxD, w, dt) for w in weights)
            if biases:
                q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = (
                    y + b.astype(dt)
                    for y, b in zip((q_BxLxHxK, k_BxLxGxK, v_BxLxGxK), biases, strict=True)
                )
        else:
            # One GEMM for Q, K and V together: a wider matmul keeps the cores busier.
            qkv_BxLx_HGGxK = dense(x_BxLxD, jnp.concatenate(weights, axis=1), dt)
            if biases:
                qkv_BxLx_HGGxK = qkv_BxLx_HGGxK + jnp.concatenate(biases, axis=0).astype(dt)
            q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = jnp.split(qkv_BxLx_HGGxK, [h, h + g], axis=2)
        q_BxLxHxK = constrain(q_BxLxHxK, ("act_batch", "act_length", "act_heads", None))
        if cfg.position == "rope":
            inv_freq_K2 = rope_inv_freq(cfg)
            q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, cfg.rope_theta, inv_freq_K2)
            k_BxLxGxK = rope(k_BxLxGxK, positions_BxL, cfg.rope_theta, inv_freq_K2)
        return q_BxLxHxK, k_BxLxGxK, v_BxLxGxK

    def _out(self, out_BxLxHxK: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        out_BxLxD = dense(out_BxLxHxK, self.wo[...], dt, in_dims=2)
        if self.cfg.bias:
            out_BxLxD = out_BxLxD + self.bo[...].astype(dt)
        return constrain(out_BxLxD, ("act_batch", "act_length", "act_embed"))

    def __call__(
        self,
        x_BxLxD: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        causal: bool = True,
        cache: LayerCache | None = None,
        prefix_rows: bool = False,
    ) -> tuple[jax.Array, LayerCache | None]:
        """(output [B, L, D], cache) for L tokens.

        Without a cache, tokens attend within their segment (and to earlier tokens if `causal`).
        With one, their keys and values are written into it and they attend to the cached ones
        allowed by its mask; `segment_ids_BxL` and `causal` are then unused. `prefix_rows` says
        each row is one segment from position 0 and then padding (segment 0), which a kernel
        with `prefix` masks by length.
        """
        impl = attention_kernel(self.cfg.attention, x_BxLxD.shape[1])
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._qkv(x_BxLxD, positions_BxL)
        kernel = KERNELS[impl]
        packed = kernel.packed
        if cache is None and prefix_rows and kernel.prefix is not None:
            lengths_B = jnp.sum(segment_ids_BxL > 0, axis=1, dtype=jnp.int32)
            out_BxLxHxK = kernel.prefix(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, lengths_B, causal)
        elif cache is None and packed is not None:
            out_BxLxHxK = packed(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal)
        elif cache is None:
            mask_Bx1xLxL = attention_mask(segment_ids_BxL, causal)
            out_BxLxHxK = dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_Bx1xLxL, impl)
        else:
            cache, k_BxGxSxK, v_BxGxSxK = cache.update(k_BxLxGxK, v_BxLxGxK)
            out_BxLxHxK = dot_product_attention(
                q_BxLxHxK, k_BxGxSxK, v_BxGxSxK, cache.mask_Bx1xLxS, impl, heads_major=True
            )
        return self._out(out_BxLxHxK), cache
