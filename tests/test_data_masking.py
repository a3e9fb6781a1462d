"""Masked-LM corruption hits the rate exactly, splits 80/10/10, spares specials, keeps words."""

import numpy as np
import pytest

from lm.data.masking import SPECIAL_IDS, mask_tokens, word_starts
from lm.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, train_tokenizer

VOCAB = 1000


def batch(rows: int = 200, length: int = 512, seed: int = 0) -> np.ndarray:
    """int32 [rows, length] (>= 100k tokens) with ~5% special tokens scattered through it."""
    rng = np.random.default_rng(seed)
    ids_BxL = rng.integers(len(SPECIAL_IDS), VOCAB, (rows, length)).astype(np.int32)
    specials = rng.random((rows, length)) < 0.05
    ids_BxL[specials] = rng.choice(SPECIAL_IDS, specials.sum())
    return ids_BxL


def random_word_starts(ids_BxL: np.ndarray, seed: int = 1) -> np.ndarray:
    """Words of 1-4 pieces on average, as SentencePiece would give."""
    return np.random.default_rng(seed).random(ids_BxL.shape) < 0.6


def word_ids(ids_BxL: np.ndarray, starts_BxL: np.ndarray) -> np.ndarray:
    """Per-row word numbers, with special tokens as words of their own (as `mask_tokens` does)."""
    special_BxL = np.isin(ids_BxL, SPECIAL_IDS)
    starts_BxL = starts_BxL | special_BxL
    starts_BxL[:, 1:] |= special_BxL[:, :-1]
    starts_BxL[:, 0] = True
    return np.cumsum(starts_BxL, axis=1) - 1


def test_each_row_masks_round_rate_times_its_candidates_split_80_10_10():
    ids_BxL = batch()
    inputs_BxL, targets_BxL, weights_BxL = mask_tokens(
        ids_BxL, np.random.default_rng(0), rate=0.15, vocab_size=VOCAB
    )
    candidates_B = (~np.isin(ids_BxL, SPECIAL_IDS)).sum(axis=1)
    chosen_BxL = weights_BxL > 0
    np.testing.assert_array_equal(chosen_BxL.sum(axis=1), np.rint(0.15 * candidates_B))
    assert abs(chosen_BxL.sum() / candidates_B.sum() - 0.15) < 0.005

    chosen_inputs, chosen_targets = inputs_BxL[chosen_BxL], ids_BxL[chosen_BxL]
    masked = np.mean(chosen_inputs == MASK_ID)
    replaced = np.mean((chosen_inputs != MASK_ID) & (chosen_inputs != chosen_targets))
    kept = np.mean(chosen_inputs == chosen_targets)
    assert abs(masked - 0.8) < 0.015 and abs(replaced - 0.1) < 0.015 and abs(kept - 0.1) < 0.015
    np.testing.assert_array_equal(targets_BxL, ids_BxL)


@pytest.mark.parametrize("whole_words", [False, True])
def test_specials_are_never_chosen_or_drawn_and_unchosen_inputs_are_untouched(whole_words):
    ids_BxL = batch()
    starts_BxL = random_word_starts(ids_BxL) if whole_words else None
    inputs_BxL, _, weights_BxL = mask_tokens(
        ids_BxL, np.random.default_rng(3), vocab_size=VOCAB, word_starts_BxL=starts_BxL
    )
    special_BxL = np.isin(ids_BxL, SPECIAL_IDS)
    assert weights_BxL.dtype == np.float32 and set(np.unique(weights_BxL)) == {0.0, 1.0}
    assert not weights_BxL[special_BxL].any()
    np.testing.assert_array_equal(inputs_BxL[weights_BxL == 0], ids_BxL[weights_BxL == 0])
    # Every changed position is chosen; the changes are the mask id or an ordinary id.
    changed_BxL = inputs_BxL != ids_BxL
    assert (weights_BxL[changed_BxL] == 1).all()
    replacements = inputs_BxL[changed_BxL & (inputs_BxL != MASK_ID)]
    assert replacements.size > 1000 and not np.isin(replacements, SPECIAL_IDS).any()
    assert replacements.min() >= len(SPECIAL_IDS) and replacements.max() < VOCAB


def test_whole_word_mode_never_splits_a_word_and_keeps_the_rate():
    ids_BxL = batch()
    starts_BxL = random_word_starts(ids_BxL)
    inputs_BxL, _, weights_BxL = mask_tokens(
        ids_BxL, np.random.default_rng(5), vocab_size=VOCAB, word_starts_BxL=starts_BxL
    )
    words_BxL = word_ids(ids_BxL, starts_BxL)
    rows_BxL = np.broadcast_to(np.arange(ids_BxL.shape[0])[:, None], ids_BxL.shape)
    keys = rows_BxL * ids_BxL.shape[1] + words_BxL
    ordinary = ~np.isin(ids_BxL, SPECIAL_IDS)
    # Per word: the fraction of pieces chosen (and masked) is 0 or 1, never in between.
    for per_piece in (weights_BxL > 0, inputs_BxL == MASK_ID):
        pieces = np.bincount(keys[ordinary])
        hits = np.bincount(keys[ordinary], weights=per_piece[ordinary], minlength=pieces.size)
        used = pieces > 0
        assert np.isin(hits[used] / pieces[used], [0.0, 1.0]).all()
    assert abs(weights_BxL.sum() / ordinary.sum() - 0.15) < 0.005


def test_same_seed_same_output_and_another_seed_differs():
    ids_BxL = batch(rows=4, length=64)
    starts_BxL = random_word_starts(ids_BxL)
    for starts in (None, starts_BxL):
        first, second, other = (
            mask_tokens(
                ids_BxL, np.random.default_rng(seed), vocab_size=VOCAB, word_starts_BxL=starts
            )
            for seed in (7, 7, 8)
        )
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(first[2], other[2])


def test_word_starts_follow_sentencepiece_word_boundaries(tmp_path):
    corpus = ["the king and the queen\nthe kingdom of the queen\n"] * 20
    tokenizer = train_tokenizer(corpus, tmp_path / "t.model", vocab_size=290)
    text = "the kingdom 😀\nand queens"
    ids = [BOS_ID, *tokenizer.encode(text), EOS_ID, *tokenizer.encode("queen"), PAD_ID]
    starts = word_starts(tokenizer, np.array([ids]))[0]
    bounds = [*np.flatnonzero(starts), len(ids)]
    words = [tokenizer._sp.decode(ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    # Control tokens decode to "": each is a word of its own, as is the newline.
    assert words == ["", "the", " kingdom", " 😀", "\n", "and", " queens", "", "queen", ""]
    assert len(ids) > len(words)  # some words span several pieces
    assert tokenizer.pieces()[7] == "\n" and tokenizer.pieces() is tokenizer.pieces()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rate=0.0), "Masking rate must be in (0, 1), got 0.0."),
        (dict(rate=1.0), "Masking rate must be in (0, 1), got 1.0."),
        (
            dict(vocab_size=7),
            "vocab_size=7 leaves no id for random replacement; it must exceed the 7 special ids "
            "[0, 1, 2, 3, 4, 5, 6].",
        ),
        (
            dict(word_starts_BxL=np.ones((2, 3), bool)),
            "word_starts_BxL has shape (2, 3); it must match ids_BxL's (2, 4).",
        ),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, message):
    ids_BxL = np.full((2, 4), 10, np.int32)
    with pytest.raises(ValueError) as error:
        mask_tokens(ids_BxL, np.random.default_rng(0), **{"vocab_size": VOCAB, **kwargs})
    assert str(error.value) == message


def test_ids_must_be_a_batch():
    with pytest.raises(ValueError) as error:
        mask_tokens(np.arange(10, 20), np.random.default_rng(0), vocab_size=VOCAB)
    assert str(error.value) == "ids_BxL must be 2-D [batch, length], got shape (10,)."
