"""Training objectives: each maps (model, batch) to summed losses and metrics.

Objectives return sums (never means) together with the number of scored targets, so the train
step can accumulate micro-batches and divide once: the loss of a global batch is the same
whatever the mesh, the micro-batch split or the number of processes. Metric sums (`*_sum`) are
per-row vectors [B]; the train and eval steps reduce them over the batch in one place
(`lm.train.step.reduce_sums`), in an order that does not depend on the device layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]


def row_sum(x: jax.Array) -> jax.Array:
    """[B, ...] → [B]: the sum over every axis but the batch axis (row-local, no communication)."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array, z_loss: float = 0.0):
    """(per-token cross-entropy, per-token z-loss term), both [B, L] float32.

    The target logit is picked with a one-hot product rather than a gather: XLA fuses it into
    the reduction, and its gradient is elementwise instead of a scatter (~20% faster on CPU).
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    one_hot_BxLxV = jax.nn.one_hot(targets_BxL, logits_BxLxV.shape[-1], dtype=jnp.float32)
    nll_BxL = lse_BxL - jnp.sum(logits_BxLxV * one_hot_BxLxV, axis=-1)
    z_BxL = z_loss * jnp.square(lse_BxL) if z_loss else 0.0
    return nll_BxL, z_BxL


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

    def loss(
        self, model, batch: Batch, dropout_key: jax.Array | None = None, evaluating: bool = False
    ):
        """(summed loss, per-row metric sums [B]); `evaluating` adds top-1 accuracy (an argmax)."""
        logits_BxLxV = model(
            batch["inputs"], batch["segment_ids"], batch["positions"], dropout_key=dropout_key
        )
        nll_BxL, z_BxL = token_losses(logits_BxLxV, batch["targets"], self.z_loss)
        w_BxL = batch["weights"]
        metrics = {"nll_sum": row_sum(nll_BxL * w_BxL), "weight_sum": row_sum(w_BxL)}
        if evaluating:
            correct_BxL = logits_BxLxV.argmax(-1) == batch["targets"]
            metrics["correct_sum"] = row_sum(correct_BxL * w_BxL)
        return jnp.sum((nll_BxL + z_BxL) * w_BxL), metrics
