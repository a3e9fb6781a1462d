"""BERT-style masked-LM corruption of token batches, per token or per whole word.

A row's budget is exactly round(rate * non-special tokens), not a Bernoulli draw per token:
every row, short or long, carries the same share of training signal. Candidates (tokens, or
words in whole-word mode) are taken in a random order until the budget is spent. Each chosen
candidate is then, independently, replaced by `mask_id` (80%), by a random non-special id
(10%) or left as it is (10%); a whole word shares one decision, while a random replacement
draws a fresh id for each of its pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lm.data.tokenizer import (
    BOS_ID,
    CLS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    UNK_ID,
    Tokenizer,
)

SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID, CLS_ID)
_WORD_PREFIX = "\u2581"  # SentencePiece's mark for a space before a piece


def word_starts(tokenizer: Tokenizer, ids_BxL: np.ndarray) -> np.ndarray:
    """bool [B, L]: True where a piece begins a word.

    A word begins at a piece starting with '▁', at a newline or special token (each a word of
    its own), after one of those, and at the start of a row: models here have no dummy
    prefix, so a line's first word carries no '▁'.
    """
    pieces = tokenizer.pieces()
    prefixed_V = np.array([piece.startswith(_WORD_PREFIX) for piece in pieces])
    alone_V = np.array([piece == "\n" for piece in pieces])
    alone_V[list(SPECIAL_IDS)] = True
    alone_BxL = alone_V[ids_BxL]
    starts_BxL = prefixed_V[ids_BxL] | alone_BxL
    starts_BxL[:, 1:] |= alone_BxL[:, :-1]
    starts_BxL[:, 0] = True
    return starts_BxL


def mask_tokens(
    ids_BxL: np.ndarray,
    rng: np.random.Generator,
    *,
    rate: float = 0.15,
    mask_id: int = MASK_ID,
    vocab_size: int,
    special_ids: Sequence[int] = SPECIAL_IDS,
    word_starts_BxL: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corrupt ~`rate` of each row's non-special tokens; returns (inputs, targets, weights).

    `targets` are the original ids; `weights` (float32) are 1 exactly at the chosen positions.
    With `word_starts_BxL` (see `word_starts`), whole words are chosen: the last word taken may
    overshoot a row's budget by its length minus one. `special_ids` and `mask_id` are never
    chosen nor drawn as replacements. The output is a function of `rng`'s state and the input.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"Masking rate must be in (0, 1), got {rate}.")
    special = np.array(sorted({*special_ids, mask_id}))
    if vocab_size <= len(special):
        raise ValueError(
            f"vocab_size={vocab_size} leaves no id for random replacement; it must exceed the "
            f"{len(special)} special ids {special.tolist()}."
        )
    if ids_BxL.ndim != 2:
        raise ValueError(f"ids_BxL must be 2-D [batch, length], got shape {ids_BxL.shape}.")
    if word_starts_BxL is not None and word_starts_BxL.shape != ids_BxL.shape:
        raise ValueError(
            f"word_starts_BxL has shape {word_starts_BxL.shape}; it must match ids_BxL's "
            f"{ids_BxL.shape}."
        )
    B, L = ids_BxL.shape
    special_BxL = np.isin(ids_BxL, special)
    # Number the words of each row (token mode: every token is a word). Special tokens are
    # words of their own, so a choice never reaches them.
    starts_BxL = np.ones((B, L), bool) if word_starts_BxL is None else word_starts_BxL.astype(bool)
    starts_BxL |= special_BxL
    starts_BxL[:, 1:] |= special_BxL[:, :-1]
    starts_BxL[:, 0] = True
    word_BxL = np.cumsum(starts_BxL, axis=1) - 1
    # Word-level arrays are [B, L] too: a row has at most L words; unused slots have length 0.
    flat_word = (np.arange(B)[:, None] * L + word_BxL).ravel()
    length_BxW = np.bincount(flat_word, weights=~special_BxL.ravel(), minlength=B * L)
    length_BxW = length_BxW.reshape(B, L).astype(np.int64)

    # All draws have fixed shapes, so equal seeds give equal outputs whatever the content.
    key_BxW = rng.random((B, L))
    action_BxW = rng.random((B, L))
    ordinary_ids = np.setdiff1d(np.arange(vocab_size), special)
    random_ids_BxL = ordinary_ids[rng.integers(0, len(ordinary_ids), (B, L))]

    budget_B = np.rint(rate * length_BxW.sum(axis=1))
    key_BxW[length_BxW == 0] = np.inf  # special-only and unused word slots come last
    order_BxW = np.argsort(key_BxW, axis=1)
    sorted_length_BxW = np.take_along_axis(length_BxW, order_BxW, axis=1)
    spent_before_BxW = np.cumsum(sorted_length_BxW, axis=1) - sorted_length_BxW
    chosen_sorted_BxW = (spent_before_BxW < budget_B[:, None]) & (sorted_length_BxW > 0)
    chosen_BxW = np.zeros((B, L), bool)
    np.put_along_axis(chosen_BxW, order_BxW, chosen_sorted_BxW, axis=1)

    chosen_BxL = np.take_along_axis(chosen_BxW, word_BxL, axis=1)
    action_BxL = np.take_along_axis(action_BxW, word_BxL, axis=1)
    masked_BxL = chosen_BxL & (action_BxL < 0.8)
    randomised_BxL = chosen_BxL & (action_BxL >= 0.8) & (action_BxL < 0.9)
    inputs_BxL = np.where(masked_BxL, mask_id, np.where(randomised_BxL, random_ids_BxL, ids_BxL))
    return inputs_BxL.astype(ids_BxL.dtype), ids_BxL.copy(), chosen_BxL.astype(np.float32)
