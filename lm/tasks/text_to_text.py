"""Text-to-text SFT: the causal LM itself learns to continue a prompt with the answer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lm.config import Config, ConfigError, FinetuneConfig
from lm.data.tokenizer import TextTokenizer
from lm.model.transformer import Transformer
from lm.runtime.platforms import for_platform
from lm.tasks.base import Task, register
from lm.tasks.encoding import TaskStats, check_counts, frame_ids, layout, pad_rows
from lm.train.objectives import TokenCrossEntropy


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
    check_counts(len(inputs), "inputs", len(targets), "targets")
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
    segment_ids_NxL, positions_NxL = layout([len(r) - 1 for r in rows], seq_len)
    arrays = {
        # Cut before padding, so a row's last token is a target only, never an input.
        "inputs": pad_rows([r[:-1] for r in rows], seq_len, pad),
        "targets": pad_rows([r[1:] for r in rows], seq_len, pad),
        "weights": pad_rows(weight_rows, seq_len, 0.0, np.float32),
        "segment_ids": segment_ids_NxL,
        "positions": positions_NxL,
    }
    return arrays, TaskStats(len(rows), truncated, dropped, dropped_target)


@register
class TextToTextTask(Task):
    name = "text_to_text"
    metrics = ("exact_match", "token_f1", "loss")
    backbone_path = ()  # the model is the causal-LM Transformer itself
    output_groups = frozenset({"unembed"})
    predicts_tokens = True
    hf_architecture = ""

    def check(self, f: FinetuneConfig) -> None:
        if f.trainable == "head":
            raise ConfigError(
                "finetune.trainable=head needs a task head, but text_to_text trains the "
                "language model itself; use trainable=all or last_k, or LoRA "
                "(finetune.lora_rank)."
            )

    def reference(self, f: FinetuneConfig, record: dict, index: int) -> object:
        return str(record[f.label_column])

    def encode(self, cfg: Config, tokenizer: TextTokenizer, examples):
        prompts, answers = examples
        return encode_text_to_text(
            tokenizer, prompts, answers, cfg.data.seq_len, cfg.finetune.template
        )

    def row_shapes(self, cfg: Config):
        length = (cfg.data.seq_len,)
        return super().row_shapes(cfg) | {
            "targets": (length, np.int32),
            "weights": (length, np.float32),
        }

    def model(self, cfg: Config, rngs):
        return Transformer(cfg.model, rngs=rngs)

    def objective(self, cfg: Config, train: dict[str, np.ndarray]):
        return TokenCrossEntropy(
            loss_chunk=for_platform(cfg).train.loss_chunk, prefix_rows=self.prefix_rows(cfg)
        )

    def prefix_rows(self, cfg: Config) -> bool:
        """Whether each encoded row is one example from position 0, then padding."""
        return True
