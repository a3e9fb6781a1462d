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

`IndexedRows` computes any row from its index and the documents' offsets in the token stream,
one code path for documents tokenized in memory (`MemoryStream`) and for the shards
`lm data prepare` writes (`lm.data.prepared.ShardStream`), which are never loaded whole.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lm.config import DataConfig
from lm.data.batches import StepBatcher, Table
from lm.data.mixture import MixtureBatcher
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


class TokenStream(Protocol):
    """Documents' tokens concatenated, read by position: `MemoryStream` here, or prepared
    shards (`lm.data.prepared.ShardStream`)."""

    tokens: int  # length of the stream
    documents: int
    nonempty_documents: int  # documents with at least one token

    def read(self, positions: np.ndarray) -> np.ndarray:
        """int32 token ids at `positions` (any shape, each in [0, tokens))."""
        ...

    def document_ids(self, positions: np.ndarray) -> np.ndarray:
        """int32 1-based index of the document holding each of `positions`."""
        ...

    def all_offsets(self) -> np.ndarray:
        """int64 [documents + 1]: every document's start in the stream, then its end."""
        ...


class MemoryStream:
    """Tokenized documents held in memory as one stream."""

    def __init__(self, docs: Sequence[Sequence[int]]):
        lengths = np.array([len(d) for d in docs], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays = [np.asarray(d, np.int32) for d in docs]
        self.stream = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        self.tokens, self.documents = len(self.stream), len(docs)
        self.nonempty_documents = int((lengths > 0).sum())

    def read(self, positions: np.ndarray) -> np.ndarray:
        return self.stream[positions]

    def document_ids(self, positions: np.ndarray) -> np.ndarray:
        # 'right': an empty document shares its start with the next one, which holds the token.
        return np.searchsorted(self.offsets, positions, side="right").astype(np.int32)

    def all_offsets(self) -> np.ndarray:
        return self.offsets


class IndexedRows:
    """Rows of a token stream laid out as `data.packing` says, each computed from its index.

    `pack` needs only the stream's token count; `truncate` and `window` index rows by document,
    so they read every document's offset (8 bytes a document) when made.
    """

    def __init__(
        self, stream: TokenStream, seq_len: int, packing: str, stride: int = 0, pad: int = PAD_ID
    ):
        if packing not in ("pack", "truncate", "window"):
            raise ValueError(f"packing must be 'pack', 'truncate' or 'window', got '{packing}'.")
        self.stream, self.seq_len, self.packing, self.pad = stream, seq_len, packing, pad
        self.stride = (stride or seq_len) if packing == "window" else 0
        if packing == "window" and not 1 <= self.stride <= seq_len:
            raise ValueError(f"Window stride must be in [1, seq_len={seq_len}], got {stride}.")
        if packing == "pack":
            self._rows = -(-max(stream.tokens - 1, 0) // seq_len)
        else:
            self._starts = stream.all_offsets()
            lengths = np.diff(self._starts)
            if packing == "truncate":
                counts = (lengths >= 2).astype(np.int64)
            else:  # windows every `stride` tokens until one reaches the document's end
                extra = -(-np.maximum(lengths - seq_len - 1, 0) // self.stride)
                counts = np.where(lengths >= 2, 1 + extra, 0)
            self._lengths = lengths
            self._row_starts = np.concatenate([[0], np.cumsum(counts)])
            self._rows = int(self._row_starts[-1])

    def __len__(self) -> int:
        return self._rows

    def describe(self) -> str:
        return f"packs into {len(self)} rows of {self.seq_len + 1} tokens"

    def rows(self, indices: np.ndarray) -> PackedRows:
        """`PackedRows` of `indices`, each in [0, len)."""
        indices = np.asarray(indices, np.int64)
        col = np.arange(self.seq_len + 1)
        if self.packing == "pack":
            positions = indices[:, None] * self.seq_len + col
            real = positions < self.stream.tokens
            scored = None
        else:
            doc = np.searchsorted(self._row_starts, indices, side="right") - 1
            window = indices - self._row_starts[doc]
            start = window * self.stride  # 0 for truncate
            index = start[:, None] + col
            real = index < self._lengths[doc][:, None]
            positions = self._starts[doc][:, None] + index
            scored = None
            if self.packing == "window":
                # A window scores only tokens past the previous window's end; BOS never.
                first_new = np.where(window == 0, 1, start - self.stride + self.seq_len + 1)
                scored = real & (index >= first_new[:, None])
        tokens = np.full(positions.shape, self.pad, np.int32)
        doc_ids = np.zeros(positions.shape, np.int32)
        tokens[real] = self.stream.read(positions[real])
        doc_ids[real] = self.stream.document_ids(positions[real])
        return PackedRows(tokens, doc_ids, self.seq_len, scored, self.pad)

    def all(self) -> PackedRows:
        """Every row, in memory."""
        return self.rows(np.arange(len(self)))

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Model inputs for `indices`; index -1 gives an all-padding row (weight 0)."""
        indices = np.asarray(indices, np.int64)
        real = indices >= 0
        rows = self.rows(np.where(real, indices, 0))
        return make_batch(rows, np.where(real, np.arange(len(indices)), -1))

    def stats(self) -> RowStats:
        """What the rows cost (padding, truncation), from the counts alone."""
        L, rows = self.seq_len, len(self)
        if not rows:
            return RowStats(self.stream.documents, 0, 0.0, 0.0)
        if self.packing == "pack":
            targets = self.stream.tokens - 1  # every stream token but the first, once
            # A document's first token follows another document's last: no loss there.
            scored = targets - (self.stream.nonempty_documents - 1)
            return RowStats(
                self.stream.documents, rows, (rows * L - targets) / (rows * L), scored / (rows * L)
            )
        lengths = self._lengths[self._lengths >= 2]
        if self.packing == "truncate":
            real = np.minimum(lengths, L + 1) - 1
            excess = np.maximum(lengths - L - 1, 0)
            return RowStats(
                self.stream.documents,
                rows,
                (rows * L - real.sum()) / (rows * L),
                real.sum() / (rows * L),
                int((excess > 0).sum()),
                int(excess.sum()),
            )
        # Windows: each holds min(L + 1, what is left) tokens; each token after BOS is scored once.
        counts = np.diff(self._row_starts)[self._lengths >= 2]
        doc = np.repeat(np.arange(len(lengths)), counts)
        window = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)
        held = np.minimum(lengths[doc] - window * self.stride, L + 1)
        padding = (L - (held - 1)).sum()
        return RowStats(
            self.stream.documents, rows, padding / (rows * L), (lengths - 1).sum() / (rows * L)
        )


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, pad: int = PAD_ID) -> PackedRows:
    """Concatenate `docs` and cut the stream into rows overlapping by one token (nanoGPT style)."""
    return IndexedRows(MemoryStream(docs), seq_len, "pack", pad=pad).all()


def truncate_documents(
    docs: Sequence[Sequence[int]], seq_len: int, pad: int = PAD_ID
) -> PackedRows:
    """One padded row per document holding its first `seq_len + 1` tokens; no packing."""
    return IndexedRows(MemoryStream(docs), seq_len, "truncate", pad=pad).all()


def window_documents(
    docs: Sequence[Sequence[int]], seq_len: int, stride: int, pad: int = PAD_ID
) -> PackedRows:
    """Windows of up to `seq_len + 1` tokens every `stride` tokens of each document.

    Every token after a document's BOS is scored exactly once, in the first window that holds
    it, so with at least min(its index, seq_len + 1 - stride) tokens of left context.
    """
    if not 1 <= stride <= seq_len:
        raise ValueError(f"Window stride must be in [1, seq_len={seq_len}], got {stride}.")
    return IndexedRows(MemoryStream(docs), seq_len, "window", stride, pad).all()


def rows_for(
    docs: Sequence[Sequence[int]], seq_len: int, packing: str, stride: int = 0, pad: int = PAD_ID
) -> tuple[PackedRows, RowStats]:
    """Rows of `docs` the way `packing` says (stride 0 = seq_len) padded with `pad`, and what
    that cost."""
    rows = IndexedRows(MemoryStream(docs), seq_len, packing, stride, pad)
    return rows.all(), rows.stats()


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
    """Everything pretraining reads: the tokenizer, train batches, validation rows and stats
    (rows in memory, or read from prepared data by `lm.data.prepared.load_prepared_data`)."""

    tokenizer: TextTokenizer
    train: StepBatcher | MixtureBatcher
    validation: Table
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
