"""Fine-tuning examples: records (texts, labels, word tags, prompt/answer pairs) as padded arrays.

Every encoder returns `(arrays, stats)`. `arrays` holds numpy [N, L] rows (L = `seq_len`)
padded with the pad id, segment 0, position 0 and weight 0, with segment 1 and positions 0..n-1
on a row's n real tokens; per-example values are [N] or [N, T]. `stats` (`TaskStats`) counts
what truncation cut, so cutting is never silent; with `truncate=False` an example too long
for `seq_len` raises instead.

Classification, regression and tagging rows are `[BOS] + text + [EOS]`; a long text loses its
last tokens but keeps EOS, so a head that pools the last real token always reads the same
marker. Text-to-text rows are the train step's causal-LM batches (see `encode_text_to_text`).
BOS, EOS and pad are the tokenizer's own ids (`frame_ids`): a vocabulary without BOS/EOS,
such as BERT's WordPiece, frames rows with its [CLS] and [SEP] instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Iterable, Sequence

import numpy as np

from lm.data.tokenizer import TextTokenizer, pad_id

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


def encode_classification(
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    labels: Sequence[object],
    num_classes: int,
    seq_len: int,
    truncate: bool = True,
) -> tuple[dict[str, np.ndarray], TaskStats]:
    """Rows `[BOS] + text + [EOS]` with `label` int32 [N] in 0..num_classes-1."""
    _check_counts(len(texts), "texts", len(labels), "labels")
    label_N = np.array(
        [_class_id(v, num_classes, f"Record {i}: label", "classes") for i, v in enumerate(labels)],
        np.int32,
    )
    arrays, stats = _encode_texts(tokenizer, texts, seq_len, truncate)
    return {**arrays, "label": label_N}, stats


def encode_regression(
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    targets: Sequence[float | Sequence[float]],
    seq_len: int,
    truncate: bool = True,
) -> tuple[dict[str, np.ndarray], TaskStats]:
    """Rows `[BOS] + text + [EOS]` with `target` float32 [N, T]: T numbers per record.

    A record's target is a number (T = 1) or a sequence of numbers; every record needs the
    same T, and every number must be finite (a NaN would turn the whole loss into NaN).
    """
    _check_counts(len(texts), "texts", len(targets), "targets")
    rows = [_float_targets(value, i) for i, value in enumerate(targets)]
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ValueError(
                f"Record {i} has {len(row)} targets but record 0 has {len(rows[0])}; every "
                "record needs the same number of targets."
            )
    target_NxT = np.array(rows, np.float32).reshape(len(rows), len(rows[0]) if rows else 0)
    arrays, stats = _encode_texts(tokenizer, texts, seq_len, truncate)
    return {**arrays, "target": target_NxT}, stats


def encode_token_labels(
    tokenizer: TextTokenizer,
    tokens: Sequence[Sequence[str]],
    tags: Sequence[Sequence[int]],
    num_tags: int,
    seq_len: int,
    truncate: bool = True,
) -> tuple[dict[str, np.ndarray], TaskStats]:
    """Rows `[BOS] + pieces of each word + [EOS]` with per-piece `tags` and `tag_weights`.

    The first piece of each word carries the word's tag (int32) and weight 1 (float32); other
    pieces, BOS, EOS and padding carry IGNORE_TAG and weight 0. Words after a sentence's first
    are encoded with a leading space: the models here have no dummy prefix, so in running text
    those words get SentencePiece's '▁' mark, and encoding them bare would give pieces the
    model never saw there (and decode without the spaces). A truncated row keeps the tags of
    the words whose first piece still fits.
    """
    _check_counts(len(tokens), "token lists", len(tags), "tag lists")
    for i, (words, word_tags) in enumerate(zip(tokens, tags, strict=True)):
        if len(words) != len(word_tags):
            raise ValueError(
                f"Record {i} has {len(words)} tokens but {len(word_tags)} tags; give one tag "
                "per token."
            )
        for j, (word, tag) in enumerate(zip(words, word_tags, strict=True)):
            if not word:
                raise ValueError(f"Record {i}, token {j} is empty; every token needs a character.")
            _class_id(tag, num_tags, f"Record {i}, token {j}: tag", "tags")
    spelled = [word if j == 0 else " " + word for words in tokens for j, word in enumerate(words)]
    word_pieces = iter(tokenizer.encode_batch(spelled))
    id_rows, tag_rows = [], []
    for word_tags in tags:
        ids, row_tags = [], []
        for tag in word_tags:
            pieces = next(word_pieces)
            ids += pieces
            row_tags += [int(tag)] + [IGNORE_TAG] * (len(pieces) - 1)
        id_rows.append(ids)
        tag_rows.append(row_tags)
    arrays, stats = _encode_ids(id_rows, seq_len, truncate, frame_ids(tokenizer))
    room = seq_len - 2
    tags_NxL = _pad([[IGNORE_TAG, *t[:room], IGNORE_TAG] for t in tag_rows], seq_len, IGNORE_TAG)
    weights_NxL = (tags_NxL != IGNORE_TAG).astype(np.float32)
    return {**arrays, "tags": tags_NxL, "tag_weights": weights_NxL}, stats


def encode_text_to_text(
    tokenizer: TextTokenizer,
    inputs: Sequence[str],
    targets: Sequence[str],
    seq_len: int,
    template: str = "{input}\n",
    truncate: bool = True,
) -> tuple[dict[str, np.ndarray], TaskStats]:
    """Causal-LM SFT rows `[BOS] + prompt + answer + [EOS]` as train-step batches.

    The prompt is `template` with `{input}` replaced by the input; prompt and answer are
    encoded apart, so the answer's tokens do not depend on the prompt. Each row holds up to
    `seq_len + 1` tokens: `inputs` are all but its last, `targets` all but its first.
    `weights` are 1 exactly where the target is an answer token or EOS, so only the answer is
    learnt. A row too long first loses prompt tokens from the left (the end of the prompt,
    next to the answer, matters most), then answer tokens from the right; a cut answer also
    loses its EOS, so the model is never taught to stop mid-answer.
    """
    _check_counts(len(inputs), "inputs", len(targets), "targets")
    if "{input}" not in template:
        raise ValueError(f"template {template!r} has no '{{input}}' to put the input in.")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}.")
    bos, eos, pad = frame_ids(tokenizer)
    prompt_ids = tokenizer.encode_batch([template.replace("{input}", text) for text in inputs])
    answer_ids = tokenizer.encode_batch(list(targets))
    rows, weight_rows = [], []
    truncated = dropped = dropped_target = 0
    for i, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        excess = len(prompt) + len(answer) + 2 - (seq_len + 1)
        if excess > 0 and not truncate:
            raise ValueError(
                f"Record {i} has {len(prompt)} prompt and {len(answer)} target tokens "
                f"({len(prompt) + len(answer) + 2} with BOS and EOS) but a row holds "
                f"seq_len + 1 = {seq_len + 1}; turn truncation on (truncate=True) or raise "
                "data.seq_len."
            )
        cut_prompt = min(max(excess, 0), len(prompt))
        cut_answer = max(excess, 0) - cut_prompt
        answer = [*answer, eos][: len(answer) + 1 - cut_answer]
        prompt = prompt[cut_prompt:]
        rows.append([bos, *prompt, *answer])
        weight_rows.append([0.0] * len(prompt) + [1.0] * len(answer))
        truncated += int(excess > 0)
        dropped += max(excess, 0)
        dropped_target += cut_answer
    segment_ids_NxL, positions_NxL = _layout([len(r) - 1 for r in rows], seq_len)
    arrays = {
        # Cut before padding, so a row's last token is a target only, never an input.
        "inputs": _pad([r[:-1] for r in rows], seq_len, pad),
        "targets": _pad([r[1:] for r in rows], seq_len, pad),
        "weights": _pad(weight_rows, seq_len, 0.0, np.float32),
        "segment_ids": segment_ids_NxL,
        "positions": positions_NxL,
    }
    return arrays, TaskStats(len(rows), truncated, dropped, dropped_target)


def _encode_texts(
    tokenizer: TextTokenizer, texts: Sequence[str], seq_len: int, truncate: bool
) -> tuple[dict[str, np.ndarray], TaskStats]:
    ids = tokenizer.encode_batch(list(texts))
    return _encode_ids(ids, seq_len, truncate, frame_ids(tokenizer))


def _encode_ids(
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
    segment_ids_NxL, positions_NxL = _layout([len(r) for r in rows], seq_len)
    arrays = {
        "inputs": _pad(rows, seq_len, pad),
        "segment_ids": segment_ids_NxL,
        "positions": positions_NxL,
    }
    return arrays, TaskStats(len(rows), sum(e > 0 for e in excess), sum(excess))


def _pad(
    rows: Sequence[Sequence[float]], width: int, fill: float, dtype: type = np.int32
) -> np.ndarray:
    """[len(rows), width] array of `rows`, each at most `width` long, padded with `fill`."""
    out_NxW = np.full((len(rows), width), fill, dtype)
    for i, row in enumerate(rows):
        out_NxW[i, : len(row)] = row
    return out_NxW


def _layout(lengths: Sequence[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions) int32 [N, seq_len]: one segment over each row's real tokens."""
    col_L = np.arange(seq_len)
    real_NxL = col_L < np.asarray(lengths, np.int32).reshape(-1, 1)
    return real_NxL.astype(np.int32), np.where(real_NxL, col_L, 0).astype(np.int32)


def _check_counts(count: int, what: str, other_count: int, other: str) -> None:
    if count != other_count:
        raise ValueError(f"Got {count} {what} but {other_count} {other}; pass one per record.")


def _class_id(value: object, count: int, where: str, kind: str) -> int:
    """`value` as an int in 0..count-1, else a ValueError starting with `where`."""
    try:
        class_id = operator.index(value)  # ints and numpy ints; floats and strings refused
    except TypeError:
        class_id = -1
    if not 0 <= class_id < count:
        raise ValueError(
            f"{where} {value!r} is not one of the {count} declared {kind} 0..{count - 1}; "
            f"fix the record or change num_{kind}."
        )
    return class_id


def _float_targets(value: object, index: int) -> list[float]:
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
