"""Sequence classification: one class per text, from a pooled head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from lm.config import Config, FinetuneConfig
from lm.data.tokenizer import TextTokenizer
from lm.evaluation import task_metrics
from lm.model.heads import pooled_model
from lm.tasks.base import Task, register
from lm.tasks.encoding import TaskStats, check_counts, class_id, encode_texts, label_id
from lm.tasks.losses import class_losses, class_weight, class_weights, require_classes, task_outputs
from lm.train.objectives import Batch


def encode_classification(
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    labels: Sequence[object],
    num_classes: int,
    seq_len: int,
    truncate: bool = True,
) -> tuple[dict[str, np.ndarray], TaskStats]:
    """Rows `[BOS] + text + [EOS]` with `label` int32 [N] in 0..num_classes-1."""
    check_counts(len(texts), "texts", len(labels), "labels")
    label_N = np.array(
        [class_id(v, num_classes, f"Record {i}: label", "classes") for i, v in enumerate(labels)],
        np.int32,
    )
    arrays, stats = encode_texts(tokenizer, texts, seq_len, truncate)
    return {**arrays, "label": label_N}, stats


@dataclass(frozen=True)
class SequenceClassification:
    """One label per row (`label` int [B]); `example_weights` [B] is 0 on padding rows.

    `class_weights` (one per class) scale each row's loss and count, so the mean is a
    class-weighted mean as in PyTorch's `CrossEntropyLoss(weight=...)`.
    """

    class_weights: tuple[float, ...] = ()
    label_smoothing: float = 0.0

    def loss(self, model, batch: Batch, dropout_key=None, evaluating: bool = False):
        """(summed training loss, per-row sums [B]); `evaluating` adds `predictions` [B]."""
        logits_BxC = task_outputs(model, batch, dropout_key)
        w_B = batch["example_weights"] * class_weight(self.class_weights, batch["label"])
        nll_B, loss_B = class_losses(logits_BxC, batch["label"], self.label_smoothing)
        metrics = {"nll_sum": nll_B * w_B, "weight_sum": w_B}
        if evaluating:
            metrics["predictions"] = logits_BxC.argmax(-1)
        return jnp.sum(loss_B * w_B), metrics


@register
class ClassificationTask(Task):
    name = "classification"
    metrics = ("accuracy", "macro_f1", "loss")
    hf_architecture = "BertForSequenceClassification"
    hf_problem_type = "single_label_classification"

    def check(self, f: FinetuneConfig) -> None:
        require_classes(f)

    def reference(self, f: FinetuneConfig, record: dict, index: int) -> object:
        return label_id(record[f.label_column], f.label_names)

    def encode(self, cfg: Config, tokenizer: TextTokenizer, examples):
        inputs, labels = examples
        arrays, stats = encode_classification(
            tokenizer, inputs, labels, cfg.finetune.num_outputs, cfg.data.seq_len
        )
        return {**arrays, "example_weights": np.ones(len(inputs), np.float32)}, stats

    def row_shapes(self, cfg: Config):
        return super().row_shapes(cfg) | {
            "label": ((), np.int32),
            "example_weights": ((), np.float32),
        }

    def model(self, cfg: Config, rngs):
        return pooled_model(cfg, rngs)

    def objective(self, cfg: Config, train: dict[str, np.ndarray]):
        f = cfg.finetune
        return SequenceClassification(class_weights(f, train["label"]), f.label_smoothing)

    def scores(self, f: FinetuneConfig, arrays: dict[str, np.ndarray], predictions):
        return {
            "accuracy": task_metrics.accuracy(arrays["label"], predictions),
            "macro_f1": task_metrics.macro_f1(arrays["label"], predictions, f.num_outputs),
        }
