"""The fine-tuning task's objective, configured from the training split."""

from __future__ import annotations

import numpy as np

from lm.config import Config, ConfigError
from lm.train.objectives import (
    Regression,
    SequenceClassification,
    TokenClassification,
    TokenCrossEntropy,
)


def class_weights(cfg: Config, train: dict[str, np.ndarray]) -> tuple[float, ...]:
    """Per-class loss weights: none, 'balanced' (n / (C · count), as scikit-learn), or given."""
    f = cfg.finetune
    if not f.class_weights:
        return ()
    if f.class_weights == "balanced":
        if f.task == "token_labels":
            labels = train["tags"][train["tag_weights"] > 0]
        else:
            labels = train["label"]
        counts = np.bincount(labels, minlength=f.num_outputs).astype(np.float64)
        return tuple(float(x) for x in len(labels) / (f.num_outputs * np.maximum(counts, 1)))
    weights = tuple(float(w) for w in f.class_weights.split(","))
    if len(weights) != f.num_outputs or min(weights) < 0:
        raise ConfigError(
            f"finetune.class_weights gives {len(weights)} weights for {f.num_outputs} classes; "
            "give one non-negative weight per class, or 'balanced'."
        )
    return weights


def make_objective(cfg: Config, train: dict[str, np.ndarray]):
    """The task's objective; regression targets are standardised on the train split if asked."""
    f = cfg.finetune
    if f.task == "classification":
        return SequenceClassification(class_weights(cfg, train), f.label_smoothing)
    if f.task == "token_labels":
        return TokenClassification(class_weights(cfg, train), f.label_smoothing)
    if f.task == "regression":
        if not f.standardize_targets:
            return Regression()
        target_NxT = train["target"]
        std_T = np.maximum(target_NxT.std(0), 1e-6)
        return Regression(tuple(map(float, target_NxT.mean(0))), tuple(map(float, std_T)))
    return TokenCrossEntropy()
