"""Fine-tuning metrics against hand-computed values and numpy references."""

import numpy as np
import pytest

from lm.evaluation import task_metrics as tm


def test_accuracy_and_macro_f1_match_hand_computed_counts():
    labels = np.array([0, 0, 1, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0, 0])
    assert tm.accuracy(labels, preds) == pytest.approx(3 / 6)
    # class 0: tp 1, predicted 3, actual 2 -> 2/5; class 1: tp 2, 3, 3 -> 2/3; class 2: 0.
    # Class 3 never occurs on either side and is left out of the mean.
    assert tm.macro_f1(labels, preds, num_classes=4) == pytest.approx((2 / 5 + 2 / 3 + 0) / 3)


def test_regression_metrics_match_numpy_and_rank_ties():
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=50), rng.normal(size=50)
    assert tm.mse(y, p) == pytest.approx(np.mean((y - p) ** 2))
    assert tm.pearson(y, p) == pytest.approx(np.corrcoef(y, p)[0, 1])
    # Ties take the mean rank: [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4].
    np.testing.assert_allclose(tm._ranks(np.array([1.0, 2.0, 2.0, 3.0])), [1, 2.5, 2.5, 4])
    assert tm.spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(
        np.corrcoef([1, 2, 3, 4], [1, 2.5, 2.5, 4])[0, 1]
    )
    assert tm.spearman(y, np.exp(y)) == pytest.approx(1.0)  # monotone map
    assert tm.pearson(y, np.zeros(50)) == 0.0  # constant prediction: no correlation, no NaN


def test_token_accuracy_counts_scored_positions_only():
    tags = np.array([[-1, 1, 0, -1], [-1, 2, 2, -1]])
    preds = np.array([[2, 1, 1, 0], [0, 2, 2, 1]])
    weights = (tags >= 0).astype(np.float32)
    assert tm.token_accuracy(tags, preds, weights) == pytest.approx(3 / 4)


def test_bio_entities_chunk_like_conlleval():
    tags = ["B-PER", "I-PER", "O", "I-PER", "I-LOC", "B-LOC", "B-LOC", "I-LOC"]
    assert tm.bio_entities(tags) == {
        ("PER", 0, 1),
        ("PER", 3, 3),  # I- after O opens an entity
        ("LOC", 4, 4),  # type change opens a new one
        ("LOC", 5, 5),
        ("LOC", 6, 7),
    }


def test_entity_f1_needs_exact_spans():
    refs = [["B-N", "I-N", "O"], ["O", "B-N", "O"]]
    preds = [["B-N", "O", "O"], ["O", "B-N", "O"]]  # one span cut short, one exact
    assert tm.entity_f1(refs, preds) == pytest.approx(2 * 1 / (2 + 2))
    assert tm.entity_f1(refs, refs) == 1.0


def test_exact_match_and_token_f1_normalise_case_and_punctuation():
    refs = ["LADY MACBETH", "ROMEO", "FIRST CITIZEN"]
    preds = ["Lady Macbeth.", "JULIET", "citizen"]
    assert tm.exact_match(refs, preds) == pytest.approx(1 / 3)
    assert tm.token_f1(refs, preds) == pytest.approx((1 + 0 + 2 * 1 / 3) / 3)
