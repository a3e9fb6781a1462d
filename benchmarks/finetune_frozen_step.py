"""Train-step time of a head-only fine-tune, with and without stopping frozen gradients.

    .venv/bin/python benchmarks/finetune_frozen_step.py [--config configs/finetune/sentiment.yaml]

Both variants run the same step (same optimizer mask, frozen backbone) on one synthetic batch
of the config's shape; only `FrozenNoGradient` differs, which lets XLA skip the backward pass
of the frozen backbone. Prints the mean over `--steps` after one warm-up step.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from lm.config import load_config
from lm.model.build import build_model
from lm.runtime.mesh import batch_sharding, make_mesh
from lm.tasks.classification import SequenceClassification
from lm.train.freeze import FrozenNoGradient, freeze, trainable_groups
from lm.train.optim import make_optimizer
from lm.train.state import plan_train_state
from lm.train.step import make_train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/finetune/sentiment.yaml")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cfg = load_config(args.config, ["finetune.trainable=head"])
    rows, length = cfg.data.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(7, cfg.model.vocab_size, (rows, length)).astype(np.int32),
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": np.tile(np.arange(length), (rows, 1)).astype(np.int32),
        "label": rng.integers(0, cfg.finetune.num_outputs, rows).astype(np.int32),
        "example_weights": np.ones(rows, np.float32),
    }
    names = trainable_groups(cfg)
    tx = freeze(make_optimizer(cfg.optim, 100), names)
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        graphdef, _, shardings, init = plan_train_state(
            lambda rngs: build_model(cfg, rngs), tx, mesh, 0
        )
        placed = jax.device_put(batch, batch_sharding(mesh))
        for label, objective in [
            (
                "gradients stopped at frozen params",
                FrozenNoGradient(SequenceClassification(), names),
            ),
            ("gradients for every param", SequenceClassification()),
        ]:
            step = make_train_step(graphdef, tx, objective, shardings)
            state, metrics = step(init(), placed)
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = step(state, placed)
            jax.block_until_ready(metrics)
            print(f"{label}: {(time.perf_counter() - start) / args.steps * 1000:.0f} ms/step")


if __name__ == "__main__":
    main()
