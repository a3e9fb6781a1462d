"""Masked-LM batches: pipeline rows (`pack` or `truncate`) with BERT corruption.

Each row is corrupted by its own generator, seeded from (seed, stream, step, global row
index), so a batch is a pure function of the data, the seed and the step, whatever the number
of processes. MLM batches keep the pipeline's `segment_ids`/`positions` and use the row's
input tokens both ways: `inputs` corrupted, `targets` the originals at the same positions,
`weights` 1 exactly at the positions chosen for prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from lm.config import DataConfig
from lm.data.batches import StepBatcher, ordered_batches
from lm.data.masking import SPECIAL_IDS, mask_tokens, word_starts
from lm.data.pipeline import PackedRows, make_batch
from lm.data.tokenizer import MASK_ID, TextTokenizer, Tokenizer

_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class Masking:
    """How rows are corrupted: share of tokens, vocabulary, seed, and whole-word mode."""

    rate: float
    vocab_size: int
    seed: int
    tokenizer: Tokenizer | None = None  # given: choose whole words (all of a word's pieces)
    mask_id: int = MASK_ID
    special_ids: tuple[int, ...] = SPECIAL_IDS  # never chosen, never drawn as replacements

    def apply(self, batch: dict[str, np.ndarray], keys: np.ndarray) -> dict[str, np.ndarray]:
        """The MLM version of a `make_batch` batch; row i is corrupted from seed `keys[i]`."""
        ids_BxL = batch["inputs"]
        starts_BxL = None if self.tokenizer is None else word_starts(self.tokenizer, ids_BxL)
        inputs, weights = np.empty_like(ids_BxL), np.empty(ids_BxL.shape, np.float32)
        for i, key in enumerate(keys):
            rng = np.random.default_rng([self.seed, *map(int, key)])
            inputs[i : i + 1], _, weights[i : i + 1] = mask_tokens(
                ids_BxL[i : i + 1],
                rng,
                rate=self.rate,
                mask_id=self.mask_id,
                vocab_size=self.vocab_size,
                special_ids=self.special_ids,
                word_starts_BxL=None if starts_BxL is None else starts_BxL[i : i + 1],
            )
        return {**batch, "inputs": inputs, "targets": ids_BxL.copy(), "weights": weights}


class MaskedStepBatches:
    """Training batches of a `StepBatcher`'s rows, corrupted afresh at every step."""

    def __init__(self, steps: StepBatcher, masking: Masking):
        self.steps, self.masking = steps, masking

    def local_batch(
        self, step: int, process_index: int | None = None, process_count: int | None = None
    ) -> dict[str, np.ndarray]:
        """This process's share of the global MLM batch at `step`."""
        index = jax.process_index() if process_index is None else process_index
        batch = self.steps.local_batch(step, index, process_count)
        rows = len(batch["inputs"])
        first = index * rows
        keys = [(_TRAIN_STREAM, step, first + i) for i in range(rows)]
        return self.masking.apply(batch, np.array(keys))


def masked_eval_batches(
    rows: PackedRows, batch_size: int, masking: Masking, max_batches: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """`ordered_batches` with fixed corruption: the same masks on every call for the same seed."""
    for b, batch in enumerate(ordered_batches(rows, batch_size, max_batches)):
        keys = [(_EVAL_STREAM, 0, b * batch_size + i) for i in range(batch_size)]
        yield masking.apply(batch, np.array(keys))


def pseudo_perplexity_batches(
    rows: PackedRows, batch_size: int, masking: Masking, max_batches: int = 0
) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    """(batch count, batches) that mask each scorable token of `rows` in turn (Salazar et al.).

    Every non-special token becomes one example: its row with only that token replaced by
    `masking.mask_id`, weight 1 there. Examples fill batches of `batch_size` in order (the first
    `max_batches` when > 0); the last batch is padded with weightless rows.
    """
    base = make_batch(rows, np.arange(len(rows)))
    scorable_RxL = ~np.isin(base["inputs"], masking.special_ids) & (base["segment_ids"] > 0)
    row_E, col_E = np.nonzero(scorable_RxL)
    num_batches = -(-len(row_E) // batch_size)
    num_batches = min(num_batches, max_batches) if max_batches else num_batches

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for b in range(num_batches):
            chunk = slice(b * batch_size, (b + 1) * batch_size)
            row_b, col_b = row_E[chunk], col_E[chunk]
            fill = batch_size - len(row_b)
            batch = {k: np.pad(v[row_b], ((0, fill), (0, 0))) for k, v in base.items()}
            targets = batch["inputs"].copy()
            weights = np.zeros(targets.shape, np.float32)
            weights[np.arange(len(row_b)), col_b] = 1.0
            batch["inputs"][np.arange(len(row_b)), col_b] = masking.mask_id
            yield {**batch, "targets": targets, "weights": weights}

    return num_batches, batches()


def masking_for(data: DataConfig, vocab_size: int, tokenizer: TextTokenizer) -> Masking:
    """The corruption that `data.mask_rate` / `data.mask_whole_words` / `data.seed` describe,
    with the tokenizer's own mask and special ids (BERT's [MASK] is 103, ours 4)."""
    if tokenizer.mask is None:
        raise ValueError(
            f"Tokenizer {tokenizer.path} has no mask token, which masked-LM needs; use a "
            "tokenizer trained by `lm tokenizer train` or a BERT-style vocabulary."
        )
    specials = (
        tokenizer.pad,
        tokenizer.unk,
        tokenizer.bos,
        tokenizer.eos,
        tokenizer.sep,
        tokenizer.cls,
    )
    special_ids = tuple(sorted({tokenizer.mask, *(i for i in specials if i is not None)}))
    if data.mask_whole_words and not isinstance(tokenizer, Tokenizer):
        raise ValueError(
            "data.mask_whole_words=true reads SentencePiece word marks; set it to false for "
            f"the Hugging Face tokenizer {tokenizer.path}."
        )
    whole_words = tokenizer if data.mask_whole_words else None
    return Masking(data.mask_rate, vocab_size, data.seed, whole_words, tokenizer.mask, special_ids)
