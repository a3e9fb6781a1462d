"""Token labelling (e.g. BIO named entities): one tag per word, from a per-position head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from lm.config import Config, FinetuneConfig
from lm.data.tokenizer import TextTokenizer
from lm.evaluation import task_metrics
from lm.model.heads import TaskModel, TokenClassificationHead
from lm.model.transformer import Transformer
from lm.tasks.base import Task, register
from lm.tasks.encoding import (
    IGNORE_TAG,
    TaskStats,
    check_counts,
    class_id,
    encode_ids,
    frame_ids,
    label_id,
    pad_rows,
)
from lm.tasks.losses import class_losses, class_weight, class_weights, require_classes, task_outputs
from lm.train.objectives import Batch, row_sum


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
    check_counts(len(tokens), "token lists", len(tags), "tag lists")
    for i, (words, word_tags) in enumerate(zip(tokens, tags, strict=True)):
        if len(words) != len(word_tags):
            raise ValueError(
                f"Record {i} has {len(words)} tokens but {len(word_tags)} tags; give one tag "
                "per token."
            )
        for j, (word, tag) in enumerate(zip(words, word_tags, strict=True)):
            if not word:
                raise ValueError(f"Record {i}, token {j} is empty; every token needs a character.")
            class_id(tag, num_tags, f"Record {i}, token {j}: tag", "tags")
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
    arrays, stats = encode_ids(id_rows, seq_len, truncate, frame_ids(tokenizer))
    room = seq_len - 2
    tags_NxL = pad_rows(
        [[IGNORE_TAG, *t[:room], IGNORE_TAG] for t in tag_rows], seq_len, IGNORE_TAG
    )
    weights_NxL = (tags_NxL != IGNORE_TAG).astype(np.float32)
    return {**arrays, "tags": tags_NxL, "tag_weights": weights_NxL}, stats


@dataclass(frozen=True)
class TokenClassification:
    """One tag per scored position (`tags` int [B, L], `tag_weights` 0 where unscored)."""

    class_weights: tuple[float, ...] = ()
    label_smoothing: float = 0.0

    def loss(self, model, batch: Batch, dropout_key=None, evaluating: bool = False):
        """(summed training loss, per-row sums over scored positions [B]); `evaluating` adds
        `predictions`."""
        logits_BxLxC = task_outputs(model, batch, dropout_key)
        tags_BxL = jnp.maximum(batch["tags"], 0)  # ignored positions carry -1 and weight 0
        w_BxL = batch["tag_weights"] * class_weight(self.class_weights, tags_BxL)
        nll_BxL, loss_BxL = class_losses(logits_BxLxC, tags_BxL, self.label_smoothing)
        metrics = {"nll_sum": row_sum(nll_BxL * w_BxL), "weight_sum": row_sum(w_BxL)}
        if evaluating:
            metrics["predictions"] = logits_BxLxC.argmax(-1)
        return jnp.sum(loss_BxL * w_BxL), metrics


@register
class TokenLabelsTask(Task):
    name = "token_labels"
    metrics = ("entity_f1", "token_accuracy", "loss")

    def check(self, f: FinetuneConfig) -> None:
        require_classes(f)

    def reference(self, f: FinetuneConfig, record: dict, index: int) -> object:
        return [label_id(t, f.label_names) for t in record[f.label_column]]

    def encode(self, cfg: Config, tokenizer: TextTokenizer, examples):
        words, tags = examples
        return encode_token_labels(
            tokenizer, words, tags, cfg.finetune.num_outputs, cfg.data.seq_len
        )

    def row_shapes(self, cfg: Config):
        length = (cfg.data.seq_len,)
        return super().row_shapes(cfg) | {
            "tags": (length, np.int32),
            "tag_weights": (length, np.float32),
        }

    def model(self, cfg: Config, rngs):
        f = cfg.finetune
        backbone = Transformer(cfg.model, rngs=rngs)
        head = TokenClassificationHead(
            cfg.model, f.num_outputs, dropout_rate=f.head_dropout, rngs=rngs
        )
        return TaskModel(backbone, head)

    def objective(self, cfg: Config, train: dict[str, np.ndarray]):
        f = cfg.finetune
        scored_tags = train["tags"][train["tag_weights"] > 0]
        return TokenClassification(class_weights(f, scored_tags), f.label_smoothing)

    def scores(self, f: FinetuneConfig, arrays: dict[str, np.ndarray], predictions):
        """Accuracy over scored positions and entity F1 of the BIO tag names."""
        tags, weights = arrays["tags"], arrays["tag_weights"]
        names = np.array(f.label_names or [str(i) for i in range(f.num_outputs)])
        scored = [w > 0 for w in weights]
        return {
            "token_accuracy": task_metrics.token_accuracy(tags, predictions, weights),
            "entity_f1": task_metrics.entity_f1(
                [list(names[t[s]]) for t, s in zip(tags, scored, strict=True)],
                [list(names[p[s]]) for p, s in zip(predictions, scored, strict=True)],
            ),
        }
