"""Training objectives: each maps (model, batch) to summed losses and metrics.

Objectives return sums (never means) together with the number of scored targets, so the train
step can accumulate micro-batches and divide once: the loss of a global batch is the same
whatever the mesh, the micro-batch split or the number of processes. Metric sums (`*_sum`) are
per-row vectors [B]; the train and eval steps reduce them over the batch in one place
(`lm.train.step.reduce_sums`), in an order that does not depend on the device layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]


def row_sum(x: jax.Array) -> jax.Array:
    """[B, ...] → [B]: the sum over every axis but the batch axis (row-local, no communication)."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


@jax.custom_vjp
def nll_and_lse(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(−log softmax(logits)[target], logsumexp(logits)), both [B, L], from float32 logits.

    The forward gathers the target logit (no [B, L, V] one-hot product to write and sum); the
    backward is one elementwise pass, softmax minus the one-hot target, so the gather's
    gradient is never a scatter and no exp(logits) is kept between the passes.
    """
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return lse_BxL - target_BxL, lse_BxL


def _nll_and_lse_fwd(logits_BxLxV: jax.Array, targets_BxL: jax.Array):
    nll_BxL, lse_BxL = nll_and_lse(logits_BxLxV, targets_BxL)
    return (nll_BxL, lse_BxL), (logits_BxLxV, targets_BxL, lse_BxL)


def _nll_and_lse_bwd(residuals, cotangents):
    logits_BxLxV, targets_BxL, lse_BxL = residuals
    g_nll_BxL, g_lse_BxL = cotangents
    probs_BxLxV = jnp.exp(logits_BxLxV - lse_BxL[..., None])
    one_hot_BxLxV = jax.nn.one_hot(targets_BxL, logits_BxLxV.shape[-1], dtype=jnp.float32)
    d_logits_BxLxV = (
        probs_BxLxV * (g_nll_BxL + g_lse_BxL)[..., None] - one_hot_BxLxV * g_nll_BxL[..., None]
    )
    return d_logits_BxLxV, None


nll_and_lse.defvjp(_nll_and_lse_fwd, _nll_and_lse_bwd)


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array, z_loss: float = 0.0):
    """(per-token cross-entropy, per-token z-loss term), both [B, L] float32."""
    nll_BxL, lse_BxL = nll_and_lse(logits_BxLxV.astype(jnp.float32), targets_BxL)
    z_BxL = z_loss * jnp.square(lse_BxL) if z_loss else 0.0
    return nll_BxL, z_BxL


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked_sums(chunk_sums: Callable, params, h_NxBxCxD: jax.Array, rest_N: tuple):
    """(Σ loss, per-chunk metric sums) of `chunk_sums(params, h, *rest)` → (loss, sums) over
    the leading axis of `h_NxBxCxD` and of each array in `rest_N`, one chunk at a time.

    Differentiable in `params` and `h` through the loss only (the metric sums are reported,
    never trained on): the forward pass takes each chunk's gradient as soon as its loss, so
    the chunk's activations are freed before the next and the backward pass only scales.
    """
    loss_N, sums_N = jax.lax.map(lambda x: chunk_sums(params, *x), (h_NxBxCxD, *rest_N))
    return jnp.sum(loss_N), sums_N


def _chunked_sums_fwd(chunk_sums: Callable, params, h_NxBxCxD: jax.Array, rest_N: tuple):
    value_and_grad = jax.value_and_grad(chunk_sums, argnums=(0, 1), has_aux=True)

    def step(d_params, x):
        (loss, sums), (d_params_chunk, d_h) = value_and_grad(params, *x)
        return jax.tree.map(jnp.add, d_params, d_params_chunk), (loss, sums, d_h)

    zeros = jax.tree.map(jnp.zeros_like, params)
    d_params, (loss_N, sums_N, d_h_NxBxCxD) = jax.lax.scan(step, zeros, (h_NxBxCxD, *rest_N))
    return (jnp.sum(loss_N), sums_N), (d_params, d_h_NxBxCxD)


def _chunked_sums_bwd(chunk_sums: Callable, residuals, cotangents):
    d_params, d_h_NxBxCxD = residuals
    g_loss = cotangents[0]

    def scale(d: jax.Array) -> jax.Array:
        return (g_loss * d).astype(d.dtype)

    return jax.tree.map(scale, d_params), scale(d_h_NxBxCxD), None


chunked_sums.defvjp(_chunked_sums_fwd, _chunked_sums_bwd)


@dataclass(frozen=True)
class TokenCrossEntropy:
    """Language modelling: weighted cross-entropy of each row's `targets` under the model.

    Causal LM (next-token prediction): `targets` are `inputs` shifted by one and `weights` is 0
    at padding and across packed-document boundaries. Masked LM (BERT, `lm.data.mlm`): `inputs`
    hold the corrupted tokens, `targets` the originals at the same positions, and `weights` is 1
    exactly at the positions chosen for prediction. Which one it is depends only on the batch
    and on the model's attention mask, never on the objective. Optional z-loss (PaLM) keeps the
    softmax normaliser near 1 for stable low-precision training.
    """

    z_loss: float = 0.0
    # Tokens per chunk of the sequence for the tiled loss (0 = off); must divide the length.
    loss_chunk: int = 0
    # Each row is one sequence from position 0, then padding (`Transformer.hidden`).
    prefix_rows: bool = False

    def loss(
        self, model, batch: Batch, dropout_key: jax.Array | None = None, evaluating: bool = False
    ):
        """(summed loss, per-row metric sums [B]); `evaluating` adds top-1 accuracy (an argmax)."""
        if self.loss_chunk:
            return self._tiled_loss(model, batch, dropout_key, evaluating)
        logits_BxLxV = model(
            batch["inputs"],
            batch["segment_ids"],
            batch["positions"],
            dropout_key=dropout_key,
            prefix_rows=self.prefix_rows,
        )
        nll_BxL, z_BxL = token_losses(logits_BxLxV, batch["targets"], self.z_loss)
        w_BxL = batch["weights"]
        metrics = {"nll_sum": row_sum(nll_BxL * w_BxL), "weight_sum": row_sum(w_BxL)}
        if evaluating:
            correct_BxL = logits_BxLxV.argmax(-1) == batch["targets"]
            metrics["correct_sum"] = row_sum(correct_BxL * w_BxL)
        return jnp.sum((nll_BxL + z_BxL) * w_BxL), metrics

    def _tiled_loss(self, model, batch: Batch, dropout_key: jax.Array | None, evaluating: bool):
        """`loss` with the [B, L, V] logits never materialised, forward or backward.

        The hidden states are computed once; the loss then runs over `loss_chunk`-token slices
        of the sequence, and each slice's gradient is taken right after its loss
        (`chunked_sums`), so only one [B, C, V] slice of logits and its gradient is ever live
        and no logits are recomputed.
        """
        h_BxLxD, head = model.hidden_and_head(
            batch["inputs"],
            batch["segment_ids"],
            batch["positions"],
            dropout_key=dropout_key,
            prefix_rows=self.prefix_rows,
        )
        length, chunk = h_BxLxD.shape[1], self.loss_chunk
        if length % chunk:
            raise ValueError(f"loss_chunk={chunk} must divide the sequence length {length}.")

        def chunks(x_BxL: jax.Array) -> jax.Array:
            """[B, L, ...] → [L/C, B, C, ...]: the slices the loop runs over."""
            x_BxNxC = x_BxL.reshape(x_BxL.shape[0], length // chunk, chunk, *x_BxL.shape[2:])
            return jnp.swapaxes(x_BxNxC, 0, 1)  # rows stay on axis 1, sharded as before

        w_BxL = batch["weights"]
        xs = (chunks(h_BxLxD), chunks(batch["targets"]), chunks(w_BxL))
        # The head's parameters become explicit arguments, so `chunked_sums` can return their
        # gradient.
        sums_of, head_params = jax.closure_convert(
            lambda h, t, w: self._chunk_sums(head, h, t, w, evaluating), *(x[0] for x in xs)
        )
        loss, sums_NxB = chunked_sums(
            lambda params, *x: sums_of(*x, *params), tuple(head_params), xs[0], xs[1:]
        )
        metrics = {k: jnp.sum(v_NxB, axis=0) for k, v_NxB in sums_NxB.items()}
        return loss, {**metrics, "weight_sum": row_sum(w_BxL)}

    def _chunk_sums(
        self,
        head: Callable[[jax.Array], jax.Array],
        h_BxCxD: jax.Array,
        targets_BxC: jax.Array,
        w_BxC: jax.Array,
        evaluating: bool,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(summed loss, per-row sums [B]) of one slice, as `loss` computes them for a batch."""
        logits_BxCxV = head(h_BxCxD)
        nll_BxC, z_BxC = token_losses(logits_BxCxV, targets_BxC, self.z_loss)
        sums = {"nll_sum": row_sum(nll_BxC * w_BxC)}
        if evaluating:
            sums["correct_sum"] = row_sum((logits_BxCxV.argmax(-1) == targets_BxC) * w_BxC)
        return jnp.sum((nll_BxC + z_BxC) * w_BxC), sums
