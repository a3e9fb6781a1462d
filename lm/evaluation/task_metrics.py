"""Fine-tuning metrics in numpy: classification, regression, token labelling, text-to-text.

Every function takes plain arrays or lists (references first, predictions second) and returns
a float, so the same code scores a model and the baselines under `benchmarks/`.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np


def accuracy(labels_N: np.ndarray, predictions_N: np.ndarray) -> float:
    """Share of examples whose predicted class is the reference class."""
    labels_N, predictions_N = np.asarray(labels_N), np.asarray(predictions_N)
    return float(np.mean(labels_N == predictions_N)) if labels_N.size else 0.0


def macro_f1(labels_N: np.ndarray, predictions_N: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in references or predictions.

    A class nobody predicted and nobody holds says nothing about the model, so it is left out
    (scikit-learn's default `labels`); a class present on one side only scores F1 = 0.
    """
    labels_N, predictions_N = np.asarray(labels_N), np.asarray(predictions_N)
    scores = []
    for c in range(num_classes):
        true_pos = np.sum((predictions_N == c) & (labels_N == c))
        predicted, actual = np.sum(predictions_N == c), np.sum(labels_N == c)
        if predicted + actual:
            scores.append(2 * true_pos / (predicted + actual))
    return float(np.mean(scores)) if scores else 0.0


def mse(targets: np.ndarray, predictions: np.ndarray) -> float:
    """Mean squared error over every target value."""
    diff = np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)
    return float(np.mean(diff * diff))


def pearson(targets_N: np.ndarray, predictions_N: np.ndarray) -> float:
    """Pearson correlation of two flat series; 0 when either is constant."""
    x = np.asarray(targets_N, np.float64).ravel()
    y = np.asarray(predictions_N, np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denom) if denom > 0 else 0.0


def _ranks(values_N: np.ndarray) -> np.ndarray:
    """Ranks 1..N with ties given the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = np.argsort(values_N, kind="stable")
    sorted_N = values_N[order]
    starts = np.flatnonzero(np.r_[True, sorted_N[1:] != sorted_N[:-1]])
    ends = np.r_[starts[1:], len(values_N)]
    ranks = np.empty(len(values_N), np.float64)
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    return ranks


def spearman(targets_N: np.ndarray, predictions_N: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    x = np.asarray(targets_N, np.float64).ravel()
    y = np.asarray(predictions_N, np.float64).ravel()
    return pearson(_ranks(x), _ranks(y))


def token_accuracy(tags_NxL: np.ndarray, predictions_NxL: np.ndarray, weights_NxL) -> float:
    """Share of scored positions (weight > 0) whose predicted tag is the reference tag."""
    scored = np.asarray(weights_NxL) > 0
    hits = np.asarray(tags_NxL)[scored] == np.asarray(predictions_NxL)[scored]
    return float(np.mean(hits)) if hits.size else 0.0


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities (type, first, last) of one tag sequence, chunked as conlleval does.

    An entity starts at `B-X`, or at `I-X` that does not continue an `X` entity, and runs over
    the `I-X` tags that follow; `O` (or any other tag) ends it.
    """
    entities, current = set(), None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, kind = tag.partition("-")
        continues = current is not None and prefix == "I" and kind == current[0]
        if current is not None and not continues:
            entities.add((current[0], current[1], i - 1))
            current = None
        if prefix in ("B", "I") and not continues:
            current = (kind, i)
    return entities


def entity_f1(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> float:
    """Micro-averaged entity-level F1 over sentences of BIO tags (exact span and type match)."""
    true_pos = found = actual = 0
    for ref, pred in zip(references, predictions, strict=True):
        ref_entities, pred_entities = bio_entities(ref), bio_entities(pred)
        true_pos += len(ref_entities & pred_entities)
        found += len(pred_entities)
        actual += len(ref_entities)
    return 2 * true_pos / (found + actual) if found + actual else 0.0


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (SQuAD-style, without dropping articles)."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def exact_match(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalize_answer`."""
    pairs = list(zip(references, predictions, strict=True))
    hits = [normalize_answer(r) == normalize_answer(p) for r, p in pairs]
    return float(np.mean(hits)) if hits else 0.0


def token_f1(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean over examples of the F1 of the bag of normalized words (SQuAD's token F1)."""
    scores = []
    for ref, pred in zip(references, predictions, strict=True):
        ref_words, pred_words = normalize_answer(ref), normalize_answer(pred)
        if not ref_words or not pred_words:
            scores.append(float(ref_words == pred_words))
            continue
        common = sum((collections.Counter(ref_words) & collections.Counter(pred_words)).values())
        scores.append(2 * common / (len(ref_words) + len(pred_words)))
    return float(np.mean(scores)) if scores else 0.0
