"""Fine-tuning task metrics of a model: `lm finetune`'s periodic and final evaluations."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lm.config import Config
from lm.data.batches import ArrayTable, local_rows, ordered_batches
from lm.data.tokenizer import TextTokenizer
from lm.evaluation import task_metrics
from lm.inference.generator import Generator
from lm.runtime.mesh import to_global
from lm.tasks import task_for
from lm.tasks.encoding import Examples


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
    """The loss and the task's scores over the first `limit` (0 = all) examples."""
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
    if predictions:
        results.update(task_for(cfg).scores(f, arrays, np.concatenate(predictions)[:count]))
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
        prompts, stop = task_for(self.cfg).answer_prompts(self.cfg, self.tokenizer, inputs)
        completions = self.generator.generate_ids(
            prompts,
            max_new_tokens=f.max_new_tokens,
            temperature=0.0,
            stop=stop,
            truncate_prompt=True,
        )
        predicted = [c.text for c in completions]
        return {
            "exact_match": task_metrics.exact_match(answers, predicted),
            "token_f1": task_metrics.token_f1(answers, predicted),
        }
