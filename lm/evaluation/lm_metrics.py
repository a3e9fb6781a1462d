"""Language-model evaluation: cross-entropy, perplexity and bits-per-byte over a split.

Bits-per-byte is tokenizer-independent: total nats / (ln 2 × UTF-8 bytes of the scored text),
where the bytes are those of the scored target tokens, so a token's cost and its length in
text are counted over exactly the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import numpy as np

from lm.data.batches import local_rows
from lm.runtime.mesh import to_global
from lm.train.objectives import Batch


def evaluate_lm(
    eval_step: Callable[[object, Batch], dict],
    params,
    batches: Iterable[dict[str, np.ndarray]],
    token_bytes: np.ndarray | None,
    sharding: jax.sharding.NamedSharding,
) -> dict[str, float]:
    """loss (nats/token), perplexity, bits_per_byte and token accuracy over `batches`.

    Without `token_bytes` (e.g. masked-LM accuracy, which scores a sample of the tokens) the
    result has no bits_per_byte.
    """
    nll = correct = tokens = 0.0
    num_bytes = 0
    for batch in batches:
        sums = jax.device_get(eval_step(params, to_global(local_rows(batch), sharding)))
        nll += float(sums["nll_sum"])
        correct += float(sums["correct_sum"])
        tokens += float(sums["weight_sum"])
        if token_bytes is not None:
            num_bytes += int((token_bytes[batch["targets"]] * batch["weights"]).sum())
    if tokens == 0:
        raise ValueError("The evaluation split has no scored tokens; provide a non-empty split.")
    loss = nll / tokens
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if token_bytes is not None:
        metrics["bits_per_byte"] = nll / (math.log(2) * max(num_bytes, 1))
    return {**metrics, "accuracy": correct / tokens, "tokens": tokens}
