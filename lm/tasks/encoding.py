"""Shared pieces of task data: reading record columns and laying examples out as padded rows.

Every task encoder returns `(arrays, stats)`. `arrays` holds numpy [N, L] rows (L = `seq_len`)
padded with the pad id, segment 0, position 0 and weight 0, with segment 1 and positions 0..n-1
on a row's n real tokens; per-example values are [N] or [N, T]. `stats` (`TaskStats`) counts
what truncation cut, so cutting is never silent; with `truncate=False` an example too long
for `seq_len` raises instead.

Sequence rows are `[BOS] + text + [EOS]`; a long text loses its last tokens but keeps EOS, so a
head that pools the last real token always reads the same marker. BOS, EOS and pad are the
tokenizer's own ids (`frame_ids`): a vocabulary without BOS/EOS, such as BERT's WordPiece,
frames rows with its [CLS] and [SEP] instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Iterable, Sequence

import numpy as np

from lm.data.tokenizer import TextTokenizer, pad_id

Examples = tuple[list, list]  # (inputs, references): texts / word lists / prompts, and labels
IGNORE_TAG = -1  # tag of pieces that carry no label: non-first pieces, BOS, EOS, padding


def frame_ids(tokenizer: TextTokenizer) -> tuple[int, int, int]:
    """(start, end, pad) ids of task rows: BOS and EOS, else [CLS] and [SEP]; pad, else 0.

    Any pad id works (padding has segment 0 and weight 0); BERT's is 0 as well.
    """
    start = tokenizer.bos if tokenizer.bos is not None else tokenizer.cls
    end = tokenizer.eos if tokenizer.eos is not None else tokenizer.sep
    if start is None or end is None:
        raise ValueError(
            f"Tokenizer {tokenizer.path} has neither BOS/EOS nor [CLS]/[SEP] tokens to frame "
            "task rows with; use a tokenizer that defines them."
        )
    return start, end, pad_id(tokenizer)


@dataclasses.dataclass(frozen=True)
class TaskStats:
    """What fitting examples into `seq_len` cost: examples cut and tokens dropped."""

    examples: int
    truncated: int
    dropped_tokens: int
    dropped_target_tokens: int = 0  # text-to-text only: answer tokens (incl. EOS) cut
    # Packed rows (chat): several examples per row; with the real tokens, says padding saved.
    rows: int = 0  # 0 = one row per example
    real_tokens: int = 0


def encode_texts(
    tokenizer: TextTokenizer, texts: Sequence[str], seq_len: int, truncate: bool
) -> tuple[dict[str, np.ndarray], TaskStats]:
    """`inputs`/`segment_ids`/`positions` of rows `[BOS] + text + [EOS]`, cut to `seq_len`."""
    ids = tokenizer.encode_batch(list(texts))
    return encode_ids(ids, seq_len, truncate, frame_ids(tokenizer))


def encode_ids(
    id_rows: Sequence[Sequence[int]],
    seq_len: int,
    truncate: bool,
    frame: tuple[int, int, int],
) -> tuple[dict[str, np.ndarray], TaskStats]:
    """`inputs`/`segment_ids`/`positions` of rows `[BOS] + ids + [EOS]`, cut to `seq_len`;
    `frame` = (BOS, EOS, pad) ids."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to hold BOS and EOS, got {seq_len}.")
    room = seq_len - 2
    for i, ids in enumerate(id_rows):
        if len(ids) > room and not truncate:
            raise ValueError(
                f"Record {i} has {len(ids) + 2} tokens with BOS and EOS but seq_len={seq_len}; "
                "turn truncation on (truncate=True) or raise data.seq_len."
            )
    bos, eos, pad = frame
    rows = [[bos, *ids[:room], eos] for ids in id_rows]
    excess = [max(len(ids) - room, 0) for ids in id_rows]
    segment_ids_NxL, positions_NxL = layout([len(r) for r in rows], seq_len)
    arrays = {
        "inputs": pad_rows(rows, seq_len, pad),
        "segment_ids": segment_ids_NxL,
        "positions": positions_NxL,
    }
    return arrays, TaskStats(len(rows), sum(e > 0 for e in excess), sum(excess))


def pad_rows(
    rows: Sequence[Sequence[float]], width: int, fill: float, dtype: type = np.int32
) -> np.ndarray:
    """[len(rows), width] array of `rows`, each at most `width` long, padded with `fill`."""
    out_NxW = np.full((len(rows), width), fill, dtype)
    for i, row in enumerate(rows):
        out_NxW[i, : len(row)] = row
    return out_NxW


def layout(lengths: Sequence[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions) int32 [N, seq_len]: one segment over each row's real tokens."""
    col_L = np.arange(seq_len)
    real_NxL = col_L < np.asarray(lengths, np.int32).reshape(-1, 1)
    return real_NxL.astype(np.int32), np.where(real_NxL, col_L, 0).astype(np.int32)


def check_counts(count: int, what: str, other_count: int, other: str) -> None:
    if count != other_count:
        raise ValueError(f"Got {count} {what} but {other_count} {other}; pass one per record.")


def class_id(value: object, count: int, where: str, kind: str) -> int:
    """`value` as an int in 0..count-1, else a ValueError starting with `where`."""
    try:
        index = operator.index(value)  # ints and numpy ints; floats and strings refused
    except TypeError:
        index = -1
    if not 0 <= index < count:
        raise ValueError(
            f"{where} {value!r} is not one of the {count} declared {kind} 0..{count - 1}; "
            f"fix the record or change num_{kind}."
        )
    return index


def float_targets(value: object, index: int) -> list[float]:
    """A record's regression targets as a list of finite floats."""
    if isinstance(value, numbers.Real):
        values = [value]
    elif isinstance(value, str | bytes) or not isinstance(value, Iterable):
        values = []
    else:
        values = list(value)
    if not values or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
        raise ValueError(
            f"Record {index}: target {value!r} is not a finite number or a non-empty sequence "
            "of finite numbers."
        )
    return [float(v) for v in values]


def label_id(value: object, names: list[str]) -> object:
    """A class given by name (one of `finetune.labels`) or as an integer (possibly a string)."""
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        if value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError(
            f"Label '{value}' is not one of finetune.labels {names}; add it or fix the record."
        )
    return value
