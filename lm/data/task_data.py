"""Fine-tuning task data: examples of `finetune.dataset`, encoded for the task's model, batched.

A split's examples are `(inputs, references)`: texts, word lists or prompts, and their labels,
targets, tags or answers. Training batches are indexed by step (a fresh permutation each epoch);
evaluation batches come in order, padded with zero-weight rows.
"""

from __future__ import annotations

import numpy as np
from etils import epath

from lm.config import Config
from lm.data import finetune_demos as demos
from lm.data.local_records import local_records, require_columns
from lm.data.tokenizer import TextTokenizer, resolve_tokenizer
from lm.tasks import task_for
from lm.tasks.encoding import Examples, TaskStats


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
    if f.dataset in demos.DEMOS:
        return demos.DEMOS[f.dataset][f.task]()
    return _record_examples(cfg), []


def _record_examples(cfg: Config) -> dict[str, Examples]:
    """Examples from local .jsonl/.csv records, split by a hash of each record."""
    f, task = cfg.finetune, task_for(cfg)
    splits = local_records(f.dataset, cfg.data.validation_fraction)
    out = {}
    for split, records in splits.items():
        require_columns(records, task.columns(f), f.dataset)
        pairs = [task.example(f, r, i) for i, r in enumerate(records)]
        out[split] = ([x for x, _ in pairs], [y for _, y in pairs])
    return out


def encode(cfg: Config, tokenizer: TextTokenizer, examples: Examples):
    """(arrays, TaskStats) of one split for the task's model."""
    return task_for(cfg).encode(cfg, tokenizer, examples)


def finetune_tokenizer(
    cfg: Config, run_dir: epath.Path, init_tokenizer: TextTokenizer | None, train_inputs: list
) -> TextTokenizer:
    """This run's tokenizer (kept on resume), else init_from's, data.tokenizer, or a new one
    trained on the training inputs (their task's `corpus_text`)."""
    texts = map(task_for(cfg).corpus_text, train_inputs)
    return resolve_tokenizer(
        run_dir,
        cfg.data.tokenizer,
        cfg.model.vocab_size,
        cfg.data.tokenizer_type,
        texts,
        init_tokenizer,
    )


def stats_line(split: str, stats: TaskStats, seq_len: int) -> str:
    """One line saying how many examples of `split` were truncated, and by how much."""
    line = (
        f"{split}: {stats.examples:,} examples of up to {seq_len} tokens; {stats.truncated:,} "
        f"truncated ({stats.dropped_tokens:,} tokens dropped"
    )
    if stats.dropped_target_tokens:
        line += f", {stats.dropped_target_tokens:,} of them answer tokens"
    line += ")"
    if stats.rows:
        one_each = 1 - stats.real_tokens / max(stats.examples * seq_len, 1)
        packed = 1 - stats.real_tokens / (stats.rows * seq_len)
        line += f"; packed into {stats.rows:,} rows, padding {one_each:.0%} -> {packed:.0%}"
    return line
