"""The run skeleton shared by pretrain, finetune and bench: mesh → state (restored or fresh) →
the train step → the loop. Commands supply only what differs: data, objective, evaluation."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lm.config import Config, validate
from lm.data.pipeline import to_global
from lm.model.build import build_model
from lm.runtime.mesh import batch_sharding, check_batch_fits_mesh, make_mesh
from lm.train.checkpoint import Checkpointer, checkpoint_meta
from lm.train.loop import LoopSettings, run_loop
from lm.train.metrics import MetricsWriter
from lm.train.state import TrainState, plan_train_state
from lm.train.step import make_train_step


def run_mesh(cfg: Config) -> Mesh:
    """The mesh `cfg.mesh` asks for, once the config is checked against this machine's devices."""
    validate(cfg, jax.device_count())
    mesh = make_mesh(cfg.mesh)
    check_batch_fits_mesh(cfg, mesh)
    return mesh


@dataclasses.dataclass
class Session:
    """A run's sharded train state and how to step it; built under `jax.set_mesh(mesh)`."""

    cfg: Config
    mesh: Mesh
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    shardings: TrainState
    state: TrainState
    start: int  # the step training resumes at (0 for a fresh run)

    def train_step(self, objective) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
        """The jitted step for `objective`, with a dropout key when the model drops out."""
        dropout = self.cfg.model.dropout > 0 or self.cfg.finetune.head_dropout > 0
        return make_train_step(
            self.graphdef,
            self.tx,
            objective,
            self.shardings,
            self.cfg.optim.grad_accum,
            self.cfg.train.seed + 1 if dropout else None,
        )

    def train(
        self,
        objective,
        local_batch: Callable[[int], dict[str, np.ndarray]],
        writer: MetricsWriter,
        checkpointer: Checkpointer,
        evaluate: Callable[[TrainState], dict[str, float]] | None,
        peak_flops: float,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainState:
        """Run the shared loop from `start` on this process's rows of each step's batch."""
        rows = batch_sharding(self.mesh)
        self.state = run_loop(
            self.state,
            self.train_step(objective),
            lambda step: to_global(local_batch(step), rows),
            LoopSettings.for_run(self.cfg, peak_flops),
            writer,
            checkpointer,
            functools.partial(checkpoint_meta, self.cfg),
            evaluate,
            self.start,
            should_stop=should_stop,
        )
        return self.state


def start_session(
    cfg: Config,
    mesh: Mesh,
    tx: optax.GradientTransformation,
    checkpointer: Checkpointer | None = None,
    writer: MetricsWriter | None = None,
    fresh: Callable[[TrainState], TrainState] | None = None,
) -> Session:
    """The newest checkpoint of `checkpointer` restored onto `mesh` (a resume), else freshly
    initialised sharded state, passed through `fresh` (e.g. to copy in a pretrained backbone).
    Call under `jax.set_mesh(mesh)`."""
    graphdef, abstract, shardings, init = plan_train_state(
        lambda rngs: build_model(cfg, rngs), tx, mesh, cfg.train.seed
    )
    start = (checkpointer.latest_step() or 0) if checkpointer is not None else 0
    if start:
        state, _ = checkpointer.restore(start, abstract, shardings)
        if writer is not None:
            writer.print(f"resumed from step {start} ({checkpointer.directory})")
    else:
        state = init()
        if fresh is not None:
            state = fresh(state)
    return Session(cfg, mesh, tx, graphdef, shardings, state, start)
