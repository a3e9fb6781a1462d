"""Chat SFT: the causal LM learns the assistant turns of conversations, every turn of each.

Records are `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`
or `{"prompt": ..., "completion": ...}` (strings or message lists). Conversations are rendered
with the tokenizer's chat template, else the built-in one (`lm.data.chat_template`); the loss
falls on assistant tokens only (their content and end-of-turn tokens). With
`finetune.packing` (the default) several conversations share a row, each its own segment whose
positions restart at 0, so none attends to another; validation loss is then per assistant
token exactly as unpacked. Validation also scores the greedy answer to the last assistant turn
(exact match, token F1) after the conversation before it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from lm.config import Config, FinetuneConfig
from lm.data.chat_template import (
    BuiltinTemplate,
    Rendered,
    chat_template,
    conversation_of,
    last_answer,
)
from lm.data.local_records import record_name
from lm.data.tokenizer import TextTokenizer, pad_id
from lm.tasks.base import register
from lm.tasks.encoding import TaskStats, pad_rows
from lm.tasks.text_to_text import TextToTextTask


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each row: best-fit decreasing, so rows fill up well.

    Items keep their order within a row and rows are ordered by their first item, so the
    first rows hold the first items (as evaluation limits take the first rows).
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room > lengths[i]:
            bisect.insort(free, (room - lengths[i], row))
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])


def encode_chats(
    rendered: Sequence[Rendered], seq_len: int, pad: int, packing: bool = True
) -> tuple[dict[str, np.ndarray], TaskStats]:
    """Train-step rows of rendered conversations: `inputs` all but a conversation's last token,
    `targets` all but its first, `weights` its assistant mask on the targets.

    A conversation of more than `seq_len + 1` tokens keeps its first `seq_len + 1` (the system
    prompt and first turns; later turns are cut and counted). With `packing`, conversations share
    rows with their own segment ids and positions from 0.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}.")
    cut = [(r.ids[: seq_len + 1], r.mask[: seq_len + 1]) for r in rendered]
    excess = [max(len(r.ids) - (seq_len + 1), 0) for r in rendered]
    lengths = [max(len(ids) - 1, 1) for ids, _ in cut]
    groups = pack_rows(lengths, seq_len) if packing else [[i] for i in range(len(cut))]
    rows: dict[str, list[list[float]]] = {k: [] for k in ("inputs", "targets", "weights")}
    rows |= {"segment_ids": [], "positions": []}
    for group in groups:
        row = {k: [] for k in rows}
        for segment, i in enumerate(group, start=1):
            ids, mask = cut[i]
            n = len(ids) - 1
            row["inputs"] += ids[:-1]
            row["targets"] += ids[1:]
            row["weights"] += mask[1:]
            row["segment_ids"] += [segment] * n
            row["positions"] += range(n)
        for k in rows:
            rows[k].append(row[k])
    arrays = {
        "inputs": pad_rows(rows["inputs"], seq_len, pad),
        "targets": pad_rows(rows["targets"], seq_len, pad),
        "weights": pad_rows(rows["weights"], seq_len, 0.0, np.float32),
        "segment_ids": pad_rows(rows["segment_ids"], seq_len, 0),
        "positions": pad_rows(rows["positions"], seq_len, 0),
    }
    stats = TaskStats(
        examples=len(rendered),
        truncated=sum(e > 0 for e in excess),
        dropped_tokens=sum(excess),
        dropped_target_tokens=sum(sum(r.mask[seq_len + 1 :]) for r in rendered),
        rows=len(groups) if packing else 0,
        real_tokens=sum(len(ids) - 1 for ids, _ in cut),
    )
    return arrays, stats


@register
class ChatTask(TextToTextTask):
    """The causal LM itself, as text_to_text, on conversations (see the module docstring)."""

    name = "chat"

    def columns(self, f: FinetuneConfig) -> list[str]:
        return []  # `messages` or `prompt`/`completion`: checked per record by `example`

    def example(self, f: FinetuneConfig, record: dict, index: int) -> tuple[object, object]:
        messages = conversation_of(record, record_name(record, index))
        return messages, last_answer(messages)[1]

    def reference(self, f: FinetuneConfig, record: dict, index: int) -> object:
        return self.example(f, record, index)[1]

    def corpus_text(self, example_input: object) -> str:
        return BuiltinTemplate.text(example_input)

    def encode(self, cfg: Config, tokenizer: TextTokenizer, examples):
        conversations, _ = examples
        rendered = chat_template(tokenizer).render_all(conversations)
        return encode_chats(rendered, cfg.data.seq_len, pad_id(tokenizer), cfg.finetune.packing)

    def prefix_rows(self, cfg: Config) -> bool:
        return not cfg.finetune.packing  # packed rows hold several conversations

    def answer_prompts(
        self, cfg: Config, tokenizer: TextTokenizer, inputs: list
    ) -> tuple[list[list[int]], list[str]]:
        template = chat_template(tokenizer)
        # The answer ends at EOS / the end-of-turn token, which the generator stops at.
        return [template.prompt(last_answer(messages)[0]) for messages in inputs], []
