"""Heads on the Transformer backbone: masked-LM prediction and fine-tuning task heads.

Each model here is an `nnx.Module` with a `backbone` (the shared `Transformer`) and a `head`,
so backbone parameters keep their names and a pretrained checkpoint maps onto them directly.
Which head a fine-tuning task uses is the task's choice (`lm.tasks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import Config, ModelConfig
from lm.model.linear import dense, dense_transposed
from lm.model.params import param
from lm.model.transformer import Norm, Transformer, dropout
from lm.runtime.mesh import constrain


class MlmHead(nnx.Module):
    """BERT's masked-LM head: dense D→D + bias, exact GELU, LayerNorm, then vocabulary logits.

    The decoder is the backbone's output matrix (the embedding when tied, as in BERT) plus a
    per-token output bias.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pdt = cfg.d_model, jnp.dtype(cfg.param_dtype)
        self.w_transform = param(
            nnx.initializers.normal(cfg.init_std)(rngs.params(), (d, d), pdt),
            ("embed", None),
            decay=True,
            group="head",
        )
        self.b_transform = param(jnp.zeros((d,), pdt), ("norm",), decay=False, group="head")
        self.norm = Norm(dataclasses.replace(cfg, norm="layernorm"), group="head")
        self.b_output = param(
            jnp.zeros((cfg.vocab_size,), pdt), ("vocab",), decay=False, group="head"
        )

    def __call__(self, h_BxLxD: jax.Array, w_VxD: jax.Array) -> jax.Array:
        """float32 logits [B, L, V] from backbone hidden states and the decoder matrix."""
        dt = jnp.dtype(self.cfg.dtype)
        x_BxLxD = dense(h_BxLxD, self.w_transform[...], dt) + self.b_transform[...].astype(dt)
        x_BxLxD = self.norm(jax.nn.gelu(x_BxLxD, approximate=False))
        x_BxLxD = constrain(x_BxLxD, ("act_batch", "act_length", "act_embed"))
        logits_BxLxV = dense_transposed(x_BxLxD, w_VxD, dt, out_dtype=jnp.float32)
        logits_BxLxV = logits_BxLxV + self.b_output[...].astype(jnp.float32)
        return constrain(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))


class MaskedLM(nnx.Module):
    """A bidirectional Transformer encoder with BERT's masked-LM head (`model.causal=false`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.backbone = Transformer(cfg, rngs=rngs)
        self.head = MlmHead(cfg, rngs=rngs)

    def __call__(
        self,
        tokens_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
        token_types_BxL: jax.Array | None = None,
        prefix_rows: bool = False,
    ) -> jax.Array:
        """float32 vocabulary logits [B, L, V] at every position (the loss picks masked ones)."""
        h_BxLxD, head = self.hidden_and_head(
            tokens_BxL,
            segment_ids_BxL,
            positions_BxL,
            dropout_key=dropout_key,
            token_types_BxL=token_types_BxL,
            prefix_rows=prefix_rows,
        )
        return head(h_BxLxD)

    def hidden_and_head(
        self, *args, **kwargs
    ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        """(backbone hidden states [B, L, D] for `hidden`'s arguments, hidden → logits)."""
        backbone = self.backbone
        w_VxD = backbone.embed[...] if backbone.cfg.tie_embeddings else backbone.unembed[...]
        return backbone.hidden(*args, **kwargs), lambda h_BxCxD: self.head(h_BxCxD, w_VxD)


POOLINGS = ("first", "mean", "last")


class Dense(nnx.Module):
    """y = x W + b with W [in, out] (named `kernel`/`bias`, as the HF classifier layers map);
    a head's layer."""

    def __init__(self, cfg: ModelConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(cfg.init_std)
        self.kernel = param(
            init(rngs.params(), (d_in, d_out), pdt), ("embed", None), decay=True, group="head"
        )
        self.bias = param(jnp.zeros((d_out,), pdt), (None,), decay=False, group="head")

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        y = dense(x, self.kernel[...], self.dtype, out_dtype=out_dtype)
        return y + self.bias[...].astype(y.dtype)


def pool(h_BxLxD: jax.Array, segment_ids_BxL: jax.Array, pooling: str) -> jax.Array:
    """[B, D] summary of each row: its first token, the mean of its real tokens, or its last.

    Rows are right-padded (segment 0), so the last real token sits at (real tokens − 1): the
    only position of a causal model that has read the whole text.
    """
    if pooling == "first":
        return h_BxLxD[:, 0]
    real_BxL = segment_ids_BxL > 0
    if pooling == "mean":
        w_BxLx1 = real_BxL.astype(jnp.float32)[..., None]
        total_BxD = jnp.sum(h_BxLxD.astype(jnp.float32) * w_BxLx1, axis=1)
        return (total_BxD / jnp.maximum(w_BxLx1.sum(1), 1.0)).astype(h_BxLxD.dtype)
    last_B = jnp.maximum(real_BxL.sum(1) - 1, 0)
    return jnp.take_along_axis(h_BxLxD, last_B[:, None, None], axis=1)[:, 0]


class PooledHead(nnx.Module):
    """Pool the sequence, optionally BERT's pooler (dense + tanh), dropout, dense to C outputs.

    The outputs are class logits (classification) or real values (regression).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_outputs: int,
        *,
        pooling: str = "first",
        pooler: bool = False,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got '{pooling}'.")
        self.pooling, self.dropout_rate = pooling, dropout_rate
        self.pooler = Dense(cfg, cfg.d_model, cfg.d_model, rngs=rngs) if pooler else None
        self.classifier = Dense(cfg, cfg.d_model, num_outputs, rngs=rngs)

    def __call__(self, h_BxLxD, segment_ids_BxL, dropout_key=None) -> jax.Array:
        """float32 outputs [B, C] (logits, or regression values)."""
        x_BxD = pool(h_BxLxD, segment_ids_BxL, self.pooling)
        if self.pooler is not None:
            x_BxD = jnp.tanh(self.pooler(x_BxD))
        x_BxD = dropout(x_BxD, self.dropout_rate, dropout_key)
        return self.classifier(x_BxD, out_dtype=jnp.float32)


class TokenClassificationHead(nnx.Module):
    """Dropout then a dense layer to C tag logits at every position."""

    def __init__(self, cfg: ModelConfig, num_outputs: int, *, dropout_rate: float = 0.0, rngs):
        self.dropout_rate = dropout_rate
        self.classifier = Dense(cfg, cfg.d_model, num_outputs, rngs=rngs)

    def __call__(self, h_BxLxD, segment_ids_BxL, dropout_key=None) -> jax.Array:
        """float32 tag logits [B, L, C]."""
        x_BxLxD = dropout(h_BxLxD, self.dropout_rate, dropout_key)
        return self.classifier(x_BxLxD, out_dtype=jnp.float32)


class TaskModel(nnx.Module):
    """A backbone `Transformer` and a task head reading its final hidden states."""

    def __init__(self, backbone: Transformer, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(
        self,
        tokens_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
        token_types_BxL: jax.Array | None = None,
        prefix_rows: bool = False,
    ) -> jax.Array:
        """The head's float32 outputs: [B, C] for sequence heads, [B, L, C] for tagging."""
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones_like(tokens_BxL)
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        h_BxLxD = self.backbone.hidden(
            tokens_BxL,
            segment_ids_BxL,
            positions_BxL,
            dropout_key=keys[0],
            token_types_BxL=token_types_BxL,
            prefix_rows=prefix_rows,
        )
        return self.head(h_BxLxD, segment_ids_BxL, keys[1])


def pooled_model(cfg: Config, rngs: nnx.Rngs) -> TaskModel:
    """A backbone with the `PooledHead` that `cfg.finetune` describes (sequence-level tasks)."""
    f = cfg.finetune
    backbone = Transformer(cfg.model, rngs=rngs)
    head = PooledHead(
        cfg.model,
        f.num_outputs,
        pooling=f.pooling,
        pooler=f.pooler,
        dropout_rate=f.head_dropout,
        rngs=rngs,
    )
    return TaskModel(backbone, head)
