"""Tokenize, pack and batch text so that the batch at step N is a pure function of (data, seed, N).

Rows hold `seq_len + 1` tokens (inputs and targets overlap by one) and come from documents
(each led by the tokenizer's BOS, if it has one) in one of three ways (`data.packing`); padding
is the tokenizer's pad id, else 0 (padding carries no loss and is masked from attention):

- `pack`: concatenate all documents and cut the stream into rows, so every stream token but
  the first is a target exactly once; batches carry `segment_ids`/`positions` so attention
  never crosses documents.
- `truncate`: one row per document, its first `seq_len + 1` tokens; the rest is dropped.
- `window`: one document per row, windows starting every `stride` tokens; each token after
  BOS is scored exactly once, in the first window that holds it (Hugging Face strided
  perplexity), via a per-token `scored` mask.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from lm.config import DataConfig
from lm.data.batches import StepBatcher
from lm.data.sources import load_documents
from lm.data.tokenizer import PAD_ID, TextTokenizer, pad_id, resolve_tokenizer


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Token rows: `tokens`/`doc_ids` int32 [R, seq_len + 1]; doc id 0 marks padding.

    `scored` (bool [R, seq_len + 1], or None for all) says which targets carry loss; window
    rows use it so that tokens kept only as left context are not scored twice. `pad` is the
    token id of padding (also of the padding rows `make_batch` adds).
    """

    tokens: np.ndarray
    doc_ids: np.ndarray
    seq_len: int
    scored: np.ndarray | None = None
    pad: int = PAD_ID

    def __len__(self) -> int:
        return len(self.tokens)

    def describe(self) -> str:
        return f"packs into {len(self)} rows of {self.seq_len + 1} tokens"

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return make_batch(self, indices)

    @property
    def padding_fraction(self) -> float:
        """Share of target slots that are padding."""
        return float((self.doc_ids[:, 1:] == 0).mean()) if len(self) else 0.0

    @property
    def scored_fraction(self) -> float:
        """Share of target slots that carry loss (not padding, a new document's BOS or context)."""
        return float(_target_weights(self.doc_ids, self.scored).mean()) if len(self) else 0.0


@dataclasses.dataclass(frozen=True)
class RowStats:
    """What turning documents into rows cost: padding, and what `truncate` threw away."""

    documents: int
    rows: int
    padding_fraction: float
    scored_fraction: float
    truncated_documents: int = 0
    dropped_tokens: int = 0


def tokenize_documents(tokenizer: TextTokenizer, docs: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each document, led by BOS (GPT-2's <|endoftext|>, Llama's <s>; nothing
    for a tokenizer without one), as int32 arrays."""
    lead = [] if tokenizer.bos is None else [tokenizer.bos]
    return [np.array(lead + ids, np.int32) for ids in tokenizer.encode_batch(list(docs))]


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, pad: int = PAD_ID) -> PackedRows:
    """Concatenate `docs` and cut the stream into rows overlapping by one token (nanoGPT style)."""
    stream = np.concatenate([np.asarray(d, np.int32) for d in docs] or [np.zeros(0, np.int32)])
    ids = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int32), [len(d) for d in docs])
    num_rows = -(-max(len(stream) - 1, 0) // seq_len)
    size = num_rows * seq_len + 1
    tokens = np.full(size, pad, np.int32)
    doc_ids = np.zeros(size, np.int32)
    tokens[: len(stream)], doc_ids[: len(stream)] = stream, ids
    window = np.arange(num_rows)[:, None] * seq_len + np.arange(seq_len + 1)
    return PackedRows(tokens=tokens[window], doc_ids=doc_ids[window], seq_len=seq_len, pad=pad)


def _document_rows(
    docs: Sequence[Sequence[int]], seq_len: int, stride: int | None, pad: int
) -> PackedRows:
    """One document per row: windows every `stride` tokens, or only the first (None)."""
    tokens_rows, ids_rows, scored_rows = [], [], []
    col = np.arange(seq_len + 1)
    for doc_id, doc in enumerate(docs, start=1):
        doc = np.asarray(doc, np.int32)
        if len(doc) < 2:  # a lone BOS has no target
            continue
        # Windows start every `stride` tokens until one reaches the document's end.
        count = 1 if stride is None else 1 + -(-max(len(doc) - seq_len - 1, 0) // stride)
        starts = np.arange(count) * (stride or 0)
        index = starts[:, None] + col
        real = index < len(doc)
        tokens_rows.append(np.where(real, doc[np.minimum(index, len(doc) - 1)], pad))
        ids_rows.append(np.where(real, doc_id, 0))
        # A window scores only tokens past the previous window's end; BOS (index 0) never.
        first_new = np.concatenate([[1], starts[:-1] + seq_len + 1])
        scored_rows.append(real & (index >= first_new[:, None]))
    if not tokens_rows:
        empty = np.zeros((0, seq_len + 1), np.int32)
        return PackedRows(
            empty, empty, seq_len, None if stride is None else empty.astype(bool), pad
        )
    return PackedRows(
        tokens=np.concatenate(tokens_rows).astype(np.int32),
        doc_ids=np.concatenate(ids_rows).astype(np.int32),
        seq_len=seq_len,
        scored=None if stride is None else np.concatenate(scored_rows),
        pad=pad,
    )


def truncate_documents(
    docs: Sequence[Sequence[int]], seq_len: int, pad: int = PAD_ID
) -> PackedRows:
    """One padded row per document holding its first `seq_len + 1` tokens; no packing."""
    return _document_rows(docs, seq_len, stride=None, pad=pad)


def window_documents(
    docs: Sequence[Sequence[int]], seq_len: int, stride: int, pad: int = PAD_ID
) -> PackedRows:
    """Windows of up to `seq_len + 1` tokens every `stride` tokens of each document.

    Every token after a document's BOS is scored exactly once, in the first window that holds
    it, so with at least min(its index, seq_len + 1 - stride) tokens of left context.
    """
    if not 1 <= stride <= seq_len:
        raise ValueError(f"Window stride must be in [1, seq_len={seq_len}], got {stride}.")
    return _document_rows(docs, seq_len, stride, pad)


def rows_for(
    docs: Sequence[Sequence[int]], seq_len: int, packing: str, stride: int = 0, pad: int = PAD_ID
) -> tuple[PackedRows, RowStats]:
    """Rows of `docs` the way `packing` says (stride 0 = seq_len) padded with `pad`, and what
    that cost."""
    truncated = dropped = 0
    if packing == "pack":
        rows = pack_documents(docs, seq_len, pad)
    elif packing == "truncate":
        rows = truncate_documents(docs, seq_len, pad)
        excess = np.array([len(d) - seq_len - 1 for d in docs], np.int64)
        truncated, dropped = int((excess > 0).sum()), int(excess.clip(0).sum())
    elif packing == "window":
        rows = window_documents(docs, seq_len, stride or seq_len, pad)
    else:
        raise ValueError(f"packing must be 'pack', 'truncate' or 'window', got '{packing}'.")
    stats = RowStats(
        documents=len(docs),
        rows=len(rows),
        padding_fraction=rows.padding_fraction,
        scored_fraction=rows.scored_fraction,
        truncated_documents=truncated,
        dropped_tokens=dropped,
    )
    return rows, stats


def _target_weights(doc_ids: np.ndarray, scored: np.ndarray | None) -> np.ndarray:
    """Targets that carry loss: same document as their input, not padding, and scored."""
    doc_in, doc_out = doc_ids[:, :-1], doc_ids[:, 1:]
    weights = (doc_out == doc_in) & (doc_out != 0)
    return weights if scored is None else weights & scored[:, 1:]


def make_batch(rows: PackedRows, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs for `rows[indices]`, each [b, seq_len]; index -1 gives an all-padding row."""
    indices = np.asarray(indices)
    real = (indices >= 0)[:, None]
    tokens = np.where(real, rows.tokens[np.maximum(indices, 0)], rows.pad)
    docs = np.where(real, rows.doc_ids[np.maximum(indices, 0)], 0)
    scored = None if rows.scored is None else rows.scored[np.maximum(indices, 0)]
    doc_in = docs[:, :-1]
    # A segment starts at each row start and wherever the input's document changes.
    starts = np.ones_like(doc_in, bool)
    starts[:, 1:] = doc_in[:, 1:] != doc_in[:, :-1]
    pad = doc_in == 0
    col = np.arange(doc_in.shape[1])
    first = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": _target_weights(docs, scored).astype(np.float32),
        "segment_ids": np.where(pad, 0, np.cumsum(starts, axis=1)).astype(np.int32),
        "positions": np.where(pad, 0, col - first).astype(np.int32),
    }


@dataclasses.dataclass
class PretrainData:
    """Everything pretraining reads: the tokenizer, train batches, validation rows and stats."""

    tokenizer: TextTokenizer
    train: StepBatcher
    validation: PackedRows
    token_bytes: np.ndarray
    train_stats: RowStats
    validation_stats: RowStats


def load_pretrain_data(
    data: DataConfig, run_dir: str | os.PathLike, vocab_size: int
) -> PretrainData:
    """Documents -> tokenizer (given, reused from `run_dir`, or trained there) -> rows per split."""
    documents = load_documents(
        data.source, data.data_dir, data.validation_fraction, data.text_key or None, data.text_unit
    )
    tokenizer = resolve_tokenizer(
        run_dir, data.tokenizer, vocab_size, data.tokenizer_type, documents["train"]
    )
    (train, train_stats), (validation, validation_stats) = (
        rows_for(
            tokenize_documents(tokenizer, documents[split]),
            data.seq_len,
            data.packing,
            data.stride,
            pad_id(tokenizer),
        )
        for split in ("train", "validation")
    )
    return PretrainData(
        tokenizer=tokenizer,
        train=StepBatcher(train, data.batch_size, data.seed),
        validation=validation,
        token_bytes=tokenizer.token_bytes(),
        train_stats=train_stats,
        validation_stats=validation_stats,
    )
