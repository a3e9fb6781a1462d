"""Fine-tuning task metrics of a model: `lm finetune`'s periodic and final evaluations."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lm.config import Config
from lm.data.batches import ArrayTable, local_rows, ordered_batches
from lm.data.pipeline import to_global
from lm.data.task_data import Examples
from lm.data.tasks import frame_ids
from lm.data.tokenizer import TextTokenizer
from lm.evaluation import task_metrics
from lm.inference.generator import Generator


def _gather(x: jax.Array) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate_task(
    cfg: Config,
    eval_step,
    params,
    arrays: dict[str, np.ndarray],
    sharding,
    generate: Callable[[], dict[str, float]] | None = None,
    limit: int = 0,
) -> dict[str, float]:
    """The task's metrics (see `FINETUNE_METRICS`) over the first `limit` (0 = all) examples."""
    f = cfg.finetune
    count = len(next(iter(arrays.values())))
    if limit:
        count = min(count, limit)
        arrays = {k: v[:count] for k, v in arrays.items()}
    nll = weight = 0.0
    predictions = []
    for batch in ordered_batches(ArrayTable(arrays), cfg.data.batch_size):
        out = eval_step(params, to_global(local_rows(batch), sharding))
        nll += float(out["nll_sum"])  # scalars come back replicated on every device
        weight += float(out["weight_sum"])
        if "predictions" in out:
            predictions.append(_gather(out["predictions"]))
    if weight == 0:
        raise ValueError("The evaluation split has nothing to score; provide a non-empty split.")
    results = {"loss": nll / weight}
    pred = np.concatenate(predictions)[:count] if predictions else None
    if f.task == "classification":
        results["accuracy"] = task_metrics.accuracy(arrays["label"], pred)
        results["macro_f1"] = task_metrics.macro_f1(arrays["label"], pred, f.num_outputs)
    elif f.task == "regression":
        target = arrays["target"]
        results["mse"] = task_metrics.mse(target, pred)
        for name in ("pearson", "spearman"):
            score = getattr(task_metrics, name)
            results[name] = float(
                np.mean([score(target[:, t], pred[:, t]) for t in range(target.shape[1])])
            )
    elif f.task == "token_labels":
        tags, weights = arrays["tags"], arrays["tag_weights"]
        results["token_accuracy"] = task_metrics.token_accuracy(tags, pred, weights)
        names = np.array(f.label_names or [str(i) for i in range(f.num_outputs)])
        scored = [w > 0 for w in weights]
        results["entity_f1"] = task_metrics.entity_f1(
            [list(names[t[s]]) for t, s in zip(tags, scored, strict=True)],
            [list(names[p[s]]) for p, s in zip(pred, scored, strict=True)],
        )
    if generate is not None:
        results.update(generate())
    return results


class AnswerScorer:
    """Exact match and token F1 of greedy answers, through `lm generate`'s Generator.

    One Generator serves every evaluation of a run: each call hands it the current weights,
    so its decoding functions compile once rather than at every evaluation.
    """

    def __init__(self, cfg: Config, tokenizer: TextTokenizer, mesh):
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.generator = None

    def __call__(self, model: nnx.Module, examples: Examples) -> dict[str, float]:
        f = self.cfg.finetune
        if self.generator is None:
            max_len = min(self.cfg.data.seq_len + f.max_new_tokens, self.cfg.model.max_seq_len)
            self.generator = Generator(model, self.tokenizer, mesh=self.mesh, max_len=max_len)
        else:
            self.generator.set_weights(model)
        inputs, answers = examples
        if f.generate_examples:
            inputs, answers = inputs[: f.generate_examples], answers[: f.generate_examples]
        prompts = self.tokenizer.encode_batch([f.template.replace("{input}", x) for x in inputs])
        bos = frame_ids(self.tokenizer)[0]
        completions = self.generator.generate_ids(
            [[bos, *p] for p in prompts],
            max_new_tokens=f.max_new_tokens,
            temperature=0.0,
            stop=["\n"],
            truncate_prompt=True,
        )
        predicted = [c.text for c in completions]
        return {
            "exact_match": task_metrics.exact_match(answers, predicted),
            "token_f1": task_metrics.token_f1(answers, predicted),
        }
