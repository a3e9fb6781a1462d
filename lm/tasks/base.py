"""The `Task` interface and the registry every fine-tuning task joins by name.

A task says, for `finetune.task=<name>`: how a record's reference is read, how examples are
encoded, which model and objective train on them, how predictions are scored, which
parameters hold its outputs, how it maps to Hugging Face, and what its config must satisfy.
`lm.tasks` imports every task module, so importing it fills `TASKS`.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from lm.config import Config, ConfigError, FinetuneConfig
from lm.data.finetune_demos import DEMOS
from lm.data.tokenizer import TextTokenizer
from lm.tasks.encoding import Examples, TaskStats, frame_ids


class Task:
    """One fine-tuning task; subclasses set `name` and `metrics` and implement the methods."""

    name: str = ""
    metrics: tuple[str, ...] = ()  # reported scores; the first is the default `finetune.metric`
    # Where the backbone sits in the model's parameters: `backbone` beside the head, or the root.
    backbone_path: tuple[str, ...] = ("backbone",)
    # Parameter groups (`lm.model.params.GROUPS`) producing the outputs: they train under every
    # `finetune.trainable` choice.
    output_groups: frozenset[str] = frozenset({"head"})
    # The model outputs vocabulary logits: `lm evaluate` can score it, and validation also
    # scores greedy answers decoded from the prompts (`lm.evaluation.tasks.AnswerScorer`).
    predicts_tokens: bool = False
    # Hugging Face class the run exports as: None = none, "" = the backbone's own LM class.
    hf_architecture: str | None = None
    hf_problem_type: str = ""  # BERT's config.json `problem_type` of this task, if any

    def check(self, f: FinetuneConfig) -> None:
        """Raise ConfigError for settings this task cannot use (beyond the shared checks)."""

    def reference(self, f: FinetuneConfig, record: dict, index: int) -> object:
        """The reference (label, targets, tags, answer) of local record number `index`."""
        raise NotImplementedError

    def columns(self, f: FinetuneConfig) -> list[str]:
        """Columns every local record must have."""
        return [f.text_column, *f.label_column.split(",")]

    def example(self, f: FinetuneConfig, record: dict, index: int) -> tuple[object, object]:
        """(input, reference) of local record number `index`."""
        return record[f.text_column], self.reference(f, record, index)

    def corpus_text(self, example_input: object) -> str:
        """The text of an input that a new tokenizer trains on (word lists joined by spaces)."""
        return example_input if isinstance(example_input, str) else " ".join(example_input)

    def answer_prompts(
        self, cfg: Config, tokenizer: TextTokenizer, inputs: list
    ) -> tuple[list[list[int]], list[str]]:
        """(prompt ids whose greedy continuations are scored against the references, stop
        strings) for tasks that predict tokens: `finetune.template` after BOS, up to a newline."""
        template = cfg.finetune.template
        prompts = tokenizer.encode_batch([template.replace("{input}", x) for x in inputs])
        bos = frame_ids(tokenizer)[0]
        return [[bos, *p] for p in prompts], ["\n"]

    def encode(
        self, cfg: Config, tokenizer: TextTokenizer, examples: Examples
    ) -> tuple[dict[str, np.ndarray], TaskStats]:
        """(arrays, TaskStats) of one split: the rows the model and objective read."""
        raise NotImplementedError

    def row_shapes(self, cfg: Config) -> dict[str, tuple[tuple[int, ...], type]]:
        """(shape, dtype) of one row of each array `encode` returns: what a train step is
        compiled for when no data is at hand (`lm plan --gpu`, `--topology`)."""
        return dict.fromkeys(
            ("inputs", "segment_ids", "positions"), ((cfg.data.seq_len,), np.int32)
        )

    def model(self, cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
        """A fresh model for this task (before any LoRA wrapping)."""
        raise NotImplementedError

    def objective(self, cfg: Config, train: dict[str, np.ndarray]):
        """The training objective, configured from the encoded training split if needed."""
        raise NotImplementedError

    def scores(
        self, f: FinetuneConfig, arrays: dict[str, np.ndarray], predictions: np.ndarray
    ) -> dict[str, float]:
        """Metrics of the eval step's gathered `predictions` against the encoded `arrays`."""
        return {}


TASKS: dict[str, Task] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add an instance of `cls` to `TASKS` under its `name`."""
    if not cls.name or cls.name in TASKS:
        raise ValueError(f"Task name {cls.name!r} is empty or taken; give the task a new name.")
    TASKS[cls.name] = cls()
    return cls


def task_named(name: str) -> Task:
    """The registered task `name` (a `finetune.task` value)."""
    if name not in TASKS:
        raise ConfigError(f"finetune.task must be one of {sorted(TASKS)}, got '{name}'.")
    return TASKS[name]


def task_for(cfg: Config) -> Task:
    """The task `cfg.finetune` names, after checking the config suits it."""
    f = cfg.finetune
    task = task_named(f.task)
    metric = f.metric or task.metrics[0]
    if metric not in task.metrics:
        raise ConfigError(
            f"finetune.metric must be one of {list(task.metrics)} for {f.task}, got '{metric}'."
        )
    demo_tasks = list(DEMOS.get(f.dataset, ()))
    if demo_tasks and f.task not in demo_tasks:
        raise ConfigError(
            f"finetune.dataset={f.dataset} is a {' or '.join(demo_tasks)} demo, not "
            f"{f.task}; set finetune.task={demo_tasks[0]}."
        )
    task.check(f)
    return task
