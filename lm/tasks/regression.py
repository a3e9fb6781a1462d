"""Regression: T real values per text (one per label column), from a pooled head, with MSE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from lm.config import Config, FinetuneConfig
from lm.data.local_records import record_name
from lm.data.tokenizer import TextTokenizer
from lm.evaluation import task_metrics
from lm.model.heads import pooled_model
from lm.tasks.base import Task, register
from lm.tasks.encoding import TaskStats, check_counts, encode_texts, float_targets
from lm.tasks.losses import task_outputs
from lm.train.objectives import Batch, row_sum


def encode_regression(
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    targets: Sequence[float | Sequence[float]],
    seq_len: int,
    truncate: bool = True,
) -> tuple[dict[str, np.ndarray], TaskStats]:
    """Rows `[BOS] + text + [EOS]` with `target` float32 [N, T]: T numbers per record.

    A record's target is a number (T = 1) or a sequence of numbers; every record needs the
    same T, and every number must be finite (a NaN would turn the whole loss into NaN).
    """
    check_counts(len(texts), "texts", len(targets), "targets")
    rows = [float_targets(value, i) for i, value in enumerate(targets)]
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ValueError(
                f"Record {i} has {len(row)} targets but record 0 has {len(rows[0])}; every "
                "record needs the same number of targets."
            )
    target_NxT = np.array(rows, np.float32).reshape(len(rows), len(rows[0]) if rows else 0)
    arrays, stats = encode_texts(tokenizer, texts, seq_len, truncate)
    return {**arrays, "target": target_NxT}, stats


@dataclass(frozen=True)
class Regression:
    """Mean squared error on `target` float [B, T]; `example_weights` [B] is 0 on padding rows.

    With `mean`/`std` (one per target) the model learns standardised targets, (y - mean) / std,
    and `predictions` are mapped back to the original units.
    """

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def loss(self, model, batch: Batch, dropout_key=None, evaluating: bool = False):
        """(summed squared error, per-row sums over the T values [B]); `evaluating` adds
        `predictions`."""
        out_BxT = task_outputs(model, batch, dropout_key)
        mean_T = jnp.asarray(self.mean or 0.0, jnp.float32)
        std_T = jnp.asarray(self.std or 1.0, jnp.float32)
        err_BxT = out_BxT - (batch["target"] - mean_T) / std_T
        w_Bx1 = batch["example_weights"][:, None]
        squared_BxT = jnp.square(err_BxT) * w_Bx1
        metrics = {
            "nll_sum": row_sum(squared_BxT),
            "weight_sum": batch["example_weights"] * out_BxT.shape[-1],
        }
        if evaluating:
            metrics["predictions"] = out_BxT * std_T + mean_T
        return jnp.sum(squared_BxT), metrics


def _number(value: object, column: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: column '{column}' holds {value!r}, not a number; fix or drop it."
        ) from None


@register
class RegressionTask(Task):
    name = "regression"
    metrics = ("pearson", "spearman", "mse", "loss")
    hf_architecture = "BertForSequenceClassification"
    hf_problem_type = "regression"

    def reference(self, f: FinetuneConfig, record: dict, index: int) -> object:
        where = record_name(record, index)
        return [_number(record[c], c, where) for c in f.label_column.split(",")]

    def encode(self, cfg: Config, tokenizer: TextTokenizer, examples):
        inputs, targets = examples
        arrays, stats = encode_regression(tokenizer, inputs, targets, cfg.data.seq_len)
        return {**arrays, "example_weights": np.ones(len(inputs), np.float32)}, stats

    def row_shapes(self, cfg: Config):
        return super().row_shapes(cfg) | {
            "target": ((cfg.finetune.num_outputs,), np.float32),
            "example_weights": ((), np.float32),
        }

    def model(self, cfg: Config, rngs):
        return pooled_model(cfg, rngs)

    def objective(self, cfg: Config, train: dict[str, np.ndarray]):
        """MSE, on targets standardised by the train split's mean and std if asked."""
        if not cfg.finetune.standardize_targets:
            return Regression()
        target_NxT = train["target"]
        std_T = np.maximum(target_NxT.std(0), 1e-6)
        return Regression(tuple(map(float, target_NxT.mean(0))), tuple(map(float, std_T)))

    def scores(self, f: FinetuneConfig, arrays: dict[str, np.ndarray], predictions):
        """MSE over all values; Pearson and Spearman averaged over the T targets."""
        target = arrays["target"]
        results = {"mse": task_metrics.mse(target, predictions)}
        for name in ("pearson", "spearman"):
            score = getattr(task_metrics, name)
            results[name] = float(
                np.mean([score(target[:, t], predictions[:, t]) for t in range(target.shape[1])])
            )
        return results
