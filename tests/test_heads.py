"""Task heads and objectives against numpy references on tiny inputs."""

import jax
import numpy as np
import pytest
from conftest import random_batch, tiny_model
from flax import nnx

from lm.config import Config, FinetuneConfig
from lm.data.tokenizer import train_tokenizer
from lm.model.heads import pool
from lm.tasks import task_for
from lm.tasks.classification import SequenceClassification
from lm.tasks.regression import Regression
from lm.tasks.token_labels import TokenClassification, encode_token_labels
from lm.train.objectives import TokenCrossEntropy

B, L = 4, 12
LENGTHS = np.array([12, 7, 3, 9])


def build(task: str, vocab_size: int = 64, **finetune):
    defaults = {"classification": "a,b,c", "token_labels": "O,B-N,I-N", "regression": ""}
    f = FinetuneConfig(task=task, dataset="records.jsonl", labels=defaults[task], **finetune)
    with nnx.use_eager_sharding(False):
        cfg = Config(model=tiny_model(vocab_size=vocab_size), finetune=f)
        return task_for(cfg).model(cfg, nnx.Rngs(0))


def rows(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    real = np.arange(L) < LENGTHS[:, None]
    return {
        "inputs": np.where(real, rng.integers(7, 64, (B, L)), 0).astype(np.int32),
        "segment_ids": real.astype(np.int32),
        "positions": np.where(real, np.arange(L), 0).astype(np.int32),
        "example_weights": np.array([1, 1, 1, 0], np.float32),  # last row is padding
    }


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("pooling", ["first", "mean", "last"])
def test_pooling_reads_first_mean_or_last_real_token(pooling):
    h = np.random.default_rng(1).normal(size=(B, L, 5)).astype(np.float32)
    seg = rows()["segment_ids"]
    expected = {
        "first": h[:, 0],
        "mean": np.stack([h[i, : LENGTHS[i]].mean(0) for i in range(B)]),
        "last": h[np.arange(B), LENGTHS - 1],
    }[pooling]
    np.testing.assert_allclose(np.asarray(pool(h, seg, pooling)), expected, rtol=1e-6)


def test_classification_loss_matches_numpy_with_class_weights_and_smoothing():
    model = build("classification", pooling="last", pooler=True)
    batch = {**rows(), "label": np.array([2, 0, 1, 1], np.int32)}
    weights, eps = (0.5, 2.0, 1.0), 0.1
    objective = SequenceClassification(class_weights=weights, label_smoothing=eps)
    loss, sums = objective.loss(model, batch, evaluating=True)
    logits = np.asarray(model(batch["inputs"], batch["segment_ids"], batch["positions"]))
    lp = log_softmax(logits.astype(np.float64))
    nll = -lp[np.arange(B), batch["label"]]
    w = batch["example_weights"] * np.array(weights)[batch["label"]]
    np.testing.assert_allclose(float(loss), np.sum(((1 - eps) * nll - eps * lp.mean(-1)) * w), 1e-5)
    np.testing.assert_allclose(np.asarray(sums["nll_sum"]), nll * w, rtol=1e-5)  # per row
    np.testing.assert_allclose(np.asarray(sums["weight_sum"]), w, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(sums["predictions"]), logits.argmax(-1))


def test_regression_loss_is_mse_on_standardised_targets_and_predicts_in_units():
    model = build("regression", label_column="x,y", pooling="mean")
    batch = {**rows(), "target": np.random.default_rng(2).normal(3.0, 2.0, (B, 2)).astype("f4")}
    mean, std = (3.0, 2.5), (2.0, 0.5)
    loss, sums = Regression(mean, std).loss(model, batch, evaluating=True)
    out = np.asarray(model(batch["inputs"], batch["segment_ids"], batch["positions"]))
    err = out - (batch["target"] - np.array(mean)) / np.array(std)
    expected = np.sum(err**2 * batch["example_weights"][:, None])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # Three real rows, two targets each.
    np.testing.assert_array_equal(np.asarray(sums["weight_sum"]), [2, 2, 2, 0])
    np.testing.assert_allclose(
        np.asarray(sums["predictions"]), out * np.array(std) + np.array(mean), rtol=1e-5
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = ["the king", "Romeo and Juliet", "thou art", "Capulet", "of my lord"] * 50
    return train_tokenizer(words, tmp_path_factory.mktemp("tok") / "t.model", 300)


def test_token_loss_scores_first_piece_of_multi_piece_words_only(tokenizer):
    words = [["Bartholomew", "met", "Romeo"], ["Zanzibarian", "king"]]
    tags = [[1, 0, 1], [1, 0]]
    batch, _ = encode_token_labels(tokenizer, words, tags, 3, seq_len=40)
    assert len(tokenizer.encode(" Zanzibarian")) > 2  # a multi-piece word
    model = build("token_labels", vocab_size=tokenizer.vocab_size)
    objective = TokenClassification(label_smoothing=0.0)
    loss, sums = objective.loss(model, batch, evaluating=True)
    logits = np.asarray(model(batch["inputs"], batch["segment_ids"], batch["positions"]))
    scored = batch["tag_weights"] > 0
    assert scored.sum() == 5  # one position per word, never a continuation piece
    lp = log_softmax(logits.astype(np.float64))[scored]
    np.testing.assert_allclose(float(loss), -lp[np.arange(5), batch["tags"][scored]].sum(), 1e-5)
    # Tags on unscored pieces never reach the loss.
    moved = {**batch, "tags": np.where(scored, batch["tags"], 2)}
    assert float(objective.loss(model, moved)[0]) == pytest.approx(float(loss), rel=1e-6)


def test_sft_loss_ignores_prompt_labels():
    with nnx.use_eager_sharding(False):
        model = build("regression", label_column="x").backbone  # any causal Transformer
    batch = random_batch(rows=2, length=10, docs=1)
    batch["weights"][:, :6] = 0.0  # prompt positions
    loss, sums = TokenCrossEntropy().loss(model, batch)
    changed = {**batch, "targets": batch["targets"].copy()}
    changed["targets"][:, :6] = (changed["targets"][:, :6] + 5) % 64
    loss2, sums2 = TokenCrossEntropy().loss(model, changed)
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(np.asarray(sums2["weight_sum"]), [4, 4])
    # ...while an answer label does move it.
    changed["targets"][:, 7] = (changed["targets"][:, 7] + 5) % 64
    assert float(TokenCrossEntropy().loss(model, changed)[0]) != float(loss)


def test_heads_compose_with_dropout_only_in_training():
    model = build("classification", head_dropout=0.5)
    batch = {**rows(), "label": np.zeros(B, np.int32)}
    objective = SequenceClassification()
    base = float(objective.loss(model, batch)[0])
    assert float(objective.loss(model, batch)[0]) == base  # no key: deterministic
    assert float(objective.loss(model, batch, jax.random.key(0))[0]) != base


def test_task_model_passes_token_types_to_a_bert_style_backbone():
    f = FinetuneConfig(task="classification", dataset="records.jsonl", labels="a,b")
    cfg = Config(model=tiny_model(vocab_size=64, type_vocab_size=2), finetune=f)
    with nnx.use_eager_sharding(False):
        model = task_for(cfg).model(cfg, nnx.Rngs(0))
    batch = rows()
    tokens, segments = batch["inputs"], batch["segment_ids"]
    second_half = (np.arange(L) >= 4).astype(np.int32)[None].repeat(B, 0)
    plain = model(tokens, segments)
    typed = model(tokens, segments, token_types_BxL=second_half)
    zeros = model(tokens, segments, token_types_BxL=np.zeros_like(second_half))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(zeros))
    assert np.abs(np.asarray(plain) - np.asarray(typed)).max() > 1e-4
