"""Loss pieces shared by the class-predicting tasks (sequence classes and token tags)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ConfigError, FinetuneConfig
from lm.train.objectives import Batch


def class_losses(logits_NxC: jax.Array, labels_N: jax.Array, smoothing: float = 0.0):
    """(cross-entropy, label-smoothed cross-entropy), both float32 with the labels' shape.

    Smoothing spreads `smoothing` of the target mass evenly over all classes (Szegedy et al.);
    the plain cross-entropy is what gets reported, the smoothed one what gets trained.
    """
    log_probs_NxC = jax.nn.log_softmax(logits_NxC.astype(jnp.float32), axis=-1)
    nll_N = -jnp.take_along_axis(log_probs_NxC, labels_N[..., None], axis=-1)[..., 0]
    if not smoothing:
        return nll_N, nll_N
    return nll_N, (1.0 - smoothing) * nll_N - smoothing * log_probs_NxC.mean(-1)


def class_weight(class_weights: tuple[float, ...], labels: jax.Array) -> jax.Array | float:
    """Each label's loss weight (1 without class weights)."""
    return jnp.asarray(class_weights, jnp.float32)[labels] if class_weights else 1.0


def task_outputs(model, batch: Batch, dropout_key: jax.Array | None) -> jax.Array:
    """The task model's float32 outputs on a batch of encoded rows (one example each, from
    position 0: see `lm.tasks.encoding`)."""
    return model(
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        dropout_key=dropout_key,
        prefix_rows=True,
    )


def class_weights(f: FinetuneConfig, labels: np.ndarray) -> tuple[float, ...]:
    """Per-class loss weights: none, 'balanced' (n / (C · count), as scikit-learn), or given.

    `labels` are the train split's scored class ids, counted for 'balanced'.
    """
    if not f.class_weights:
        return ()
    if f.class_weights == "balanced":
        counts = np.bincount(labels, minlength=f.num_outputs).astype(np.float64)
        return tuple(float(x) for x in len(labels) / (f.num_outputs * np.maximum(counts, 1)))
    weights = tuple(float(w) for w in f.class_weights.split(","))
    if len(weights) != f.num_outputs or min(weights) < 0:
        raise ConfigError(
            f"finetune.class_weights gives {len(weights)} weights for {f.num_outputs} classes; "
            "give one non-negative weight per class, or 'balanced'."
        )
    return weights


def require_classes(f: FinetuneConfig) -> None:
    """A class-predicting task needs at least two classes."""
    if f.num_outputs < 2:
        raise ConfigError(
            f"finetune.task={f.task} needs at least 2 classes; set finetune.labels=NAME,NAME,... "
            "(or finetune.num_labels)."
        )
