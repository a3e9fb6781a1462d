"""Decoder-only Transformer: embeddings, pre-norm residual blocks (scanned), output head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ModelConfig
from lm.model.attention import Attention
from lm.model.kv_cache import KVCache, decode_mask
from lm.model.linear import dense
from lm.runtime.mesh import constrain

_REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""

    def __init__(self, cfg: ModelConfig):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        pdt = jnp.dtype(cfg.param_dtype)
        self.scale = nnx.Param(jnp.ones((cfg.d_model,), pdt), out_sharding=("norm",))
        if cfg.norm == "layernorm":
            self.bias = nnx.Param(jnp.zeros((cfg.d_model,), pdt), out_sharding=("norm",))

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
        if cfg.mlp == "swiglu":
            self.w_gate = nnx.Param(init(rngs.params(), (d, f), pdt), out_sharding=("embed", "mlp"))
        self.w_up = nnx.Param(init(rngs.params(), (d, f), pdt), out_sharding=("embed", "mlp"))
        self.w_down = nnx.Param(out_init(rngs.params(), (f, d), pdt), out_sharding=("mlp", "embed"))
        if cfg.bias:
            if cfg.mlp == "swiglu":
                self.b_gate = nnx.Param(jnp.zeros((f,), pdt), out_sharding=("mlp",))
            self.b_up = nnx.Param(jnp.zeros((f,), pdt), out_sharding=("mlp",))
            self.b_down = nnx.Param(jnp.zeros((d,), pdt), out_sharding=("embed",))

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
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, causal, key):
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        attend = lambda x: self.attn(x, segment_ids_BxL, positions_BxL, causal)
        x_BxLxD = self._residual(x_BxLxD, self.attn_norm, attend, keys[0])
        x_BxLxD = self._residual(x_BxLxD, self.mlp_norm, self.mlp, keys[1])
        return constrain(x_BxLxD, ("act_batch", "act_length", "act_embed"))

    def _residual(self, x_BxLxD, norm, sublayer, key):
        rate = self.cfg.dropout
        if self.cfg.norm_position == "post":
            return norm(x_BxLxD + dropout(sublayer(x_BxLxD), rate, key).astype(x_BxLxD.dtype))
        return x_BxLxD + dropout(sublayer(norm(x_BxLxD)), rate, key).astype(x_BxLxD.dtype)

    def decode(self, x_BxLxD, positions_BxL, cache, layer, start, mask_Bx1xLxS):
        """The block on L new tokens whose keys/values go into `cache` at slot `start`."""
        # `_residual` takes a plain sublayer x -> y; the box carries the updated cache out of it.
        box = {"cache": cache}

        def attend(x):
            out, box["cache"] = self.attn.decode(
                x, positions_BxL, box["cache"], layer, start, mask_Bx1xLxS
            )
            return out

        x_BxLxD = self._residual(x_BxLxD, self.attn_norm, attend, None)
        x_BxLxD = self._residual(x_BxLxD, self.mlp_norm, self.mlp, None)
        return constrain(x_BxLxD, ("act_batch", "act_length", "act_embed")), box["cache"]


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
        self.embed = nnx.Param(
            embed_init(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
            out_sharding=("vocab", "embed"),
        )
        if cfg.position == "learned":
            self.pos_embed = nnx.Param(
                embed_init(rngs.params(), (cfg.max_seq_len, cfg.d_model), pdt),
                out_sharding=("position", "embed"),
            )
        if cfg.type_vocab_size:
            self.type_embed = nnx.Param(
                embed_init(rngs.params(), (cfg.type_vocab_size, cfg.d_model), pdt),
                out_sharding=(None, "embed"),
            )
        if cfg.embed_norm:
            self.embed_norm = Norm(cfg)
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs.params(), cfg.num_layers)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        if cfg.norm_position == "pre":  # post-norm blocks already end in a norm
            self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            # Stored [vocab, d_model] like the embedding: XLA:CPU runs the larger backward
            # product (dlogits @ W) ~20% faster without a transposed operand.
            self.unembed = nnx.Param(
                embed_init(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
                out_sharding=("vocab", "embed"),
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
    ) -> jax.Array:
        """Final-norm hidden states [B, L, D] for token ids; packed rows pass segments/positions.

        `causal` defaults to the config's: False makes a bidirectional encoder, whose tokens
        still attend only within their own segment.
        """
        cfg = self.cfg
        causal = cfg.causal if causal is None else causal
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones_like(tokens_BxL)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        x_BxLxD = self.embed_tokens(tokens_BxL, positions_BxL, token_types_BxL)
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers + 1)
        if keys is not None:
            x_BxLxD = dropout(x_BxLxD, cfg.dropout, keys[-1])

        def run_block(graphdef, params, x, key):
            return nnx.merge(graphdef, params)(x, segment_ids_BxL, positions_BxL, causal, key)

        if cfg.remat != "none":
            # CSE prevention is only unnecessary inside scan, whose loop boundary blocks it.
            run_block = jax.checkpoint(
                run_block,
                policy=_REMAT_POLICIES[cfg.remat],
                prevent_cse=not cfg.scan_layers,
                static_argnums=0,
            )
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)
            layer_keys = None if keys is None else keys[:-1]

            def body(x, layer):
                params, key = layer
                return run_block(graphdef, params, x, key), None

            x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, (stacked, layer_keys))
        else:
            for i, block in enumerate(self.blocks):
                graphdef, params = nnx.split(block)
                x_BxLxD = run_block(graphdef, params, x_BxLxD, None if keys is None else keys[i])
        return self.final_norm(x_BxLxD) if cfg.norm_position == "pre" else x_BxLxD

    def hidden_cached(
        self, tokens_BxL: jax.Array, cache: KVCache, start: jax.Array, pads_B: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """Causal hidden states [B, L, D] of L tokens at cache slots start..start+L-1, using and
        extending `cache`; row b is left-padded by `pads_B[b]` slots, so its positions start there.
        """
        cfg = self.cfg
        length = tokens_BxL.shape[1]
        positions_BxL = jnp.maximum(start + jnp.arange(length)[None] - pads_B[:, None], 0)
        mask_Bx1xLxS = decode_mask(pads_B, start, length, cache.slots)
        x_BxLxD = self.embed_tokens(tokens_BxL, positions_BxL)
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)

            def body(carry, params):
                x, cache, layer = carry
                block = nnx.merge(graphdef, params)
                x, cache = block.decode(x, positions_BxL, cache, layer, start, mask_Bx1xLxS)
                return (x, cache, layer + 1), None

            (x_BxLxD, cache, _), _ = jax.lax.scan(body, (x_BxLxD, cache, 0), stacked)
        else:
            for layer, block in enumerate(self.blocks):
                x_BxLxD, cache = block.decode(
                    x_BxLxD, positions_BxL, cache, layer, start, mask_Bx1xLxS
                )
        h_BxLxD = self.final_norm(x_BxLxD) if cfg.norm_position == "pre" else x_BxLxD
        return h_BxLxD, cache

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
        w_DxV = w_VxD.T
        logits_BxLxV = dense(h_BxLxD, w_DxV, dt, out_dtype=jnp.float32)
        return constrain(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))

    def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None, **kwargs) -> jax.Array:
        return self.logits(self.hidden(tokens_BxL, segment_ids_BxL, positions_BxL, **kwargs))
