"""The Transformer: embeddings, residual blocks (scanned or unrolled), output logits; a causal
decoder or, with `causal=False`, a bidirectional encoder. One forward path, with an optional KV
cache for decoding."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ModelConfig
from lm.model.attention import Attention
from lm.model.kv_cache import KVCache, LayerCache
from lm.model.linear import dense, dense_transposed
from lm.model.params import param
from lm.runtime.mesh import constrain

_REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""

    def __init__(self, cfg: ModelConfig, *, group: str):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        pdt = jnp.dtype(cfg.param_dtype)
        d = cfg.d_model
        self.scale = param(jnp.ones((d,), pdt), ("norm",), decay=False, group=group)
        if cfg.norm == "layernorm":
            self.bias = param(jnp.zeros((d,), pdt), ("norm",), decay=False, group=group)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.scale[...]
        if self.kind == "layernorm":
            y = y + self.bias[...]
        return y.astype(x_BxLxD.dtype)


class Mlp(nnx.Module):
    """SwiGLU (silu(x W_gate) * x W_up) W_down, or GELU (gelu(x W_up) W_down); optional biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, pdt = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        matrix = functools.partial(param, decay=True, group="block", lora=(1, 1))
        bias = functools.partial(param, decay=False, group="block")
        if cfg.mlp == "swiglu":
            self.w_gate = matrix(init(rngs.params(), (d, f), pdt), ("embed", "mlp"))
        self.w_up = matrix(init(rngs.params(), (d, f), pdt), ("embed", "mlp"))
        self.w_down = matrix(out_init(rngs.params(), (f, d), pdt), ("mlp", "embed"))
        if cfg.bias:
            if cfg.mlp == "swiglu":
                self.b_gate = bias(jnp.zeros((f,), pdt), ("mlp",))
            self.b_up = bias(jnp.zeros((f,), pdt), ("mlp",))
            self.b_down = bias(jnp.zeros((d,), pdt), ("embed",))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)

        def project(x, name):
            y = dense(x, getattr(self, f"w_{name}")[...], dt)
            return y + getattr(self, f"b_{name}")[...].astype(dt) if cfg.bias else y

        h_BxLxF = project(x_BxLxD, "up")
        if cfg.mlp == "swiglu":
            h_BxLxF = jax.nn.silu(project(x_BxLxD, "gate")) * h_BxLxF
        else:
            h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=cfg.mlp == "gelu")
        h_BxLxF = constrain(h_BxLxF, ("act_batch", "act_length", "act_mlp"))
        return project(h_BxLxF, "down")


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when rate is 0 or no key is given (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
    """Residual block: x + Attn(Norm(x)), then x + Mlp(Norm(x)) (pre-norm, the default), or
    Norm(x + Attn(x)), then Norm(x + Mlp(x)) (post-norm, BERT)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg, group="block")
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, group="block")
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(
        self,
        x_BxLxD: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        causal: bool = True,
        key: jax.Array | None = None,
        cache: LayerCache | None = None,
        prefix_rows: bool = False,
    ) -> tuple[jax.Array, LayerCache | None]:
        """(output [B, L, D], cache); `key` drives dropout, `cache` and `prefix_rows` as in
        `Attention`."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        attended_BxLxD, cache = self.attn(
            self._sublayer_input(x_BxLxD, self.attn_norm),
            segment_ids_BxL,
            positions_BxL,
            causal,
            cache,
            prefix_rows,
        )
        x_BxLxD = self._add_residual(x_BxLxD, attended_BxLxD, self.attn_norm, keys[0])
        mlp_BxLxD = self.mlp(self._sublayer_input(x_BxLxD, self.mlp_norm))
        x_BxLxD = self._add_residual(x_BxLxD, mlp_BxLxD, self.mlp_norm, keys[1])
        return constrain(x_BxLxD, ("act_batch", "act_length", "act_embed")), cache

    def _sublayer_input(self, x_BxLxD: jax.Array, norm: Norm) -> jax.Array:
        return x_BxLxD if self.cfg.norm_position == "post" else norm(x_BxLxD)

    def _add_residual(
        self, x_BxLxD: jax.Array, y_BxLxD: jax.Array, norm: Norm, key: jax.Array | None
    ) -> jax.Array:
        """x + dropout(y), normalized after the sum for post-norm (normalized before the
        sublayer for pre-norm: `_sublayer_input`)."""
        x_BxLxD = x_BxLxD + dropout(y_BxLxD, self.cfg.dropout, key).astype(x_BxLxD.dtype)
        return norm(x_BxLxD) if self.cfg.norm_position == "post" else x_BxLxD


def abstract_split(make: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStructs) of the module `make()` builds, computing nothing.

    Unlike `nnx.eval_shape`, this never resolves logical axis names against an active mesh:
    shardings are derived later, in one place (`lm.runtime.mesh`).
    """
    box = {}

    def build():
        box["graphdef"], state = nnx.split(make())
        return state

    state = jax.eval_shape(build)
    return box["graphdef"], state


def _stacked_blocks(cfg: ModelConfig, key: jax.Array, num_layers: int) -> Block:
    """One Block whose parameters carry a leading 'layers' axis, for `jax.lax.scan`."""
    graphdef, _ = abstract_split(lambda: Block(cfg, rngs=nnx.Rngs(0)))
    keys = jax.random.split(key, num_layers)
    stacked = jax.vmap(lambda k: nnx.state(Block(cfg, rngs=nnx.Rngs(k))))(keys)
    stacked = jax.tree.map(
        lambda v: v.replace(out_sharding=("layers", *v.get_metadata()["out_sharding"])),
        stacked,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
    """Token embedding (+ learned positions, token types), `num_layers` blocks, final norm (pre-norm
    only), vocabulary logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        embed_init = nnx.initializers.normal(cfg.init_std)
        table = functools.partial(param, decay=False, group="embedding")
        self.embed = table(
            embed_init(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt), ("vocab", "embed")
        )
        if cfg.position == "learned":
            self.pos_embed = table(
                embed_init(rngs.params(), (cfg.max_seq_len, cfg.d_model), pdt),
                ("position", "embed"),
            )
        if cfg.type_vocab_size:
            self.type_embed = table(
                embed_init(rngs.params(), (cfg.type_vocab_size, cfg.d_model), pdt),
                (None, "embed"),
            )
        if cfg.embed_norm:
            self.embed_norm = Norm(cfg, group="embedding")
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs.params(), cfg.num_layers)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        if cfg.norm_position == "pre":  # post-norm blocks already end in a norm
            self.final_norm = Norm(cfg, group="final_norm")
        if not cfg.tie_embeddings:
            # Stored [vocab, d_model] like the embedding: XLA:CPU runs the larger backward
            # product (dlogits @ W) ~20% faster without a transposed operand.
            self.unembed = param(
                embed_init(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
                ("vocab", "embed"),
                decay=True,
                group="unembed",
            )

    def hidden(
        self,
        tokens_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
        *,
        causal: bool | None = None,
        dropout_key: jax.Array | None = None,
        token_types_BxL: jax.Array | None = None,
        cache: KVCache | None = None,
        prefix_rows: bool = False,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Final-norm hidden states [B, L, D] for token ids; packed rows pass segments/positions.

        `causal` defaults to the config's: False makes a bidirectional encoder, whose tokens
        still attend only within their own segment. `prefix_rows`: every row is one segment
        from position 0 followed by padding (segment 0), as task rows are; kernels that can
        then mask by length instead of by a dense mask (cuDNN).

        With a `cache` (generation), the tokens are every row's next L: positions and the
        causal mask come from the cache, their keys and values are written into it, and the
        result is (hidden states, the cache advanced by L).
        """
        cfg = self.cfg
        causal = cfg.causal if causal is None else causal
        length = tokens_BxL.shape[1]
        mask_Bx1xLxS = None
        if cache is not None:
            if segment_ids_BxL is not None or positions_BxL is not None:
                raise ValueError("With a cache, positions and the mask come from the cache.")
            positions_BxL = cache.positions(length)
            mask_Bx1xLxS = cache.mask(length)
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones_like(tokens_BxL)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length), tokens_BxL.shape)
        x_BxLxD = self.embed_tokens(tokens_BxL, positions_BxL, token_types_BxL)
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers + 1)
        if keys is not None:
            x_BxLxD = dropout(x_BxLxD, cfg.dropout, keys[-1])

        def run_block(graphdef, params, x, key, layer_cache):
            block = nnx.merge(graphdef, params)
            return block(x, segment_ids_BxL, positions_BxL, causal, key, layer_cache, prefix_rows)

        if cfg.remat != "none" and cache is None:  # decoding has no backward pass to remat for
            # CSE prevention is only unnecessary inside scan, whose loop boundary blocks it.
            run_block = jax.checkpoint(
                run_block,
                policy=_REMAT_POLICIES[cfg.remat],
                prevent_cse=not cfg.scan_layers,
                static_argnums=0,
            )

        def run_layer(graphdef, params, x, key, cache, layer):
            """Block `layer`, reading and writing its part of `cache` if there is one."""
            layer_cache = None if cache is None else LayerCache(cache, layer, mask_Bx1xLxS)
            x, layer_cache = run_block(graphdef, params, x, key, layer_cache)
            return x, None if layer_cache is None else layer_cache.cache

        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)
            layer_keys = None if keys is None else keys[:-1]
            # Layer numbers index the stacked cache (the carry) without slicing it per layer.
            layers = None if cache is None else jnp.arange(cfg.num_layers)

            def body(carry, xs):
                x, cache = carry
                params, key, layer = xs
                return run_layer(graphdef, params, x, key, cache, layer), None

            (x_BxLxD, cache), _ = jax.lax.scan(
                body, (x_BxLxD, cache), (stacked, layer_keys, layers)
            )
        else:
            for i, block in enumerate(self.blocks):
                graphdef, params = nnx.split(block)
                key = None if keys is None else keys[i]
                x_BxLxD, cache = run_layer(graphdef, params, x_BxLxD, key, cache, i)
        h_BxLxD = self.final_norm(x_BxLxD) if cfg.norm_position == "pre" else x_BxLxD
        return h_BxLxD if cache is None else (h_BxLxD, cache.advance(length))

    def embed_tokens(
        self,
        tokens_BxL: jax.Array,
        positions_BxL: jax.Array,
        token_types_BxL: jax.Array | None = None,
    ) -> jax.Array:
        """Token (+ learned position, + token-type) embeddings [B, L, D], then `embed_norm`.

        Token types default to 0 (segment A), as in Hugging Face BERT.
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dt)
        if cfg.position == "learned":
            x_BxLxD = x_BxLxD + jnp.take(self.pos_embed[...], positions_BxL, axis=0).astype(dt)
        if cfg.type_vocab_size:
            if token_types_BxL is None:
                token_types_BxL = jnp.zeros_like(tokens_BxL)
            x_BxLxD = x_BxLxD + jnp.take(self.type_embed[...], token_types_BxL, axis=0).astype(dt)
        if cfg.embed_norm:
            x_BxLxD = self.embed_norm(x_BxLxD)
        return constrain(x_BxLxD, ("act_batch", "act_length", "act_embed"))

    def logits(self, h_BxLxD: jax.Array) -> jax.Array:
        """Vocabulary logits in float32 from hidden states."""
        dt = jnp.dtype(self.cfg.dtype)
        w_VxD = self.embed[...] if self.cfg.tie_embeddings else self.unembed[...]
        logits_BxLxV = dense_transposed(h_BxLxD, w_VxD, dt, out_dtype=jnp.float32)
        return constrain(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))

    def hidden_and_head(
        self, *args, **kwargs
    ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        """(`hidden` of the same arguments, `logits`): what a tiled loss needs to slice."""
        return self.hidden(*args, **kwargs), self.logits

    def __call__(
        self,
        tokens_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        **kwargs,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """float32 logits [B, L, V] of `hidden` (same arguments); with a cache, (logits, cache)."""
        if cache is None:
            return self.logits(self.hidden(tokens_BxL, segment_ids_BxL, positions_BxL, **kwargs))
        h_BxLxD, cache = self.hidden(
            tokens_BxL, segment_ids_BxL, positions_BxL, cache=cache, **kwargs
        )
        return self.logits(h_BxLxD), cache
