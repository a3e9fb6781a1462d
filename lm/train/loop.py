"""The run skeleton shared by pretrain, finetune and bench, and the training loop it runs.

`run_mesh` → `start_session` (the newest checkpoint restored, or fresh sharded state) →
`Session.train`: the one train step for the command's objective, fed this process's rows of
each step's batch, through `run_loop`. Commands supply only what differs: data, objective,
evaluation. `run_loop` itself knows nothing about objectives or meshes: it calls
`train_step(state, batch)` on `batch_at(step)` and treats the returned metrics as opaque
scalars: steps, one-step-late metrics, evaluation, checkpoints.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lm.config import Config, check_training_mesh
from lm.data.pipeline import to_global
from lm.model.build import build_model
from lm.runtime.flops import train_flops_per_token
from lm.runtime.mesh import batch_sharding, make_mesh
from lm.train.checkpoint import Checkpointer, checkpoint_meta
from lm.train.metrics import MetricsWriter
from lm.train.state import TrainState, plan_train_state
from lm.train.step import make_train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class LoopSettings:
    total_steps: int  # the schedule's length
    stop_at: int  # last step to run now (== total_steps unless stopping early)
    log_every: int
    eval_every: int
    checkpoint_every: int
    tokens_per_step: int  # tokens fed per step (for tokens/s)
    flops_per_step: float  # model FLOPs of one step (for MFU)
    peak_flops: float  # peak FLOP/s of all devices together

    @classmethod
    def for_run(cls, cfg: Config, peak_flops: float) -> LoopSettings:
        """The settings `cfg.train` and `cfg.checkpoint` ask for; `peak_flops` for MFU."""
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        return cls(
            total_steps=cfg.train.steps,
            stop_at=min(cfg.train.stop_at or cfg.train.steps, cfg.train.steps),
            log_every=cfg.train.log_every,
            eval_every=cfg.train.eval_every,
            checkpoint_every=cfg.checkpoint.every,
            tokens_per_step=tokens_per_step,
            flops_per_step=train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step,
            peak_flops=peak_flops,
        )


def run_loop(
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, dict]],
    batch_at: Callable[[int], Any],
    settings: LoopSettings,
    writer: MetricsWriter,
    checkpointer: Checkpointer,
    meta_at: Callable[[int], dict],
    evaluate: Callable[[Any], dict] | None = None,
    start_step: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> Any:
    """Train from `start_step` to `settings.stop_at`; returns the final state.

    `should_stop`, asked after each evaluation, ends training early (e.g. early stopping on a
    validation metric); the state at that step is checkpointed first.

    Metrics of step N are fetched after step N+1 is dispatched, so the host never stalls the
    device. Before each checkpoint the pending metrics are checked, so a diverged state is
    never saved; divergence raises TrainingDiverged naming the step and last good checkpoint.
    """
    s = settings
    window: list[dict[str, float]] = []
    window_start = time.perf_counter()
    pending: tuple[int, dict] | None = None

    def report(step: int, metrics: dict) -> None:
        nonlocal window_start
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(values["loss"]):
            last = checkpointer.latest_step()
            where = f"step {last} in {checkpointer.directory}" if last is not None else "none"
            raise TrainingDiverged(
                f"Loss became {values['loss']} at step {step}; last good checkpoint: {where}. "
                "Lower optim.lr, raise optim.warmup_steps or set optim.clip_norm, then rerun."
            )
        window.append(values)
        if step % s.log_every and step != s.stop_at:
            return
        elapsed = time.perf_counter() - window_start
        means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        means["tokens_per_s"] = s.tokens_per_step * len(window) / elapsed
        means["mfu"] = s.flops_per_step * len(window) / elapsed / s.peak_flops
        writer.write(step, means)
        writer.progress(step, means, step - start_step)
        window.clear()
        window_start = time.perf_counter()

    for step in range(start_step, s.stop_at):
        state, metrics = train_step(state, batch_at(step))
        if pending is not None:
            report(*pending)
        done = step + 1
        pending = (done, metrics)
        evaluating = evaluate is not None and (done % s.eval_every == 0 or done == s.total_steps)
        saving = done % s.checkpoint_every == 0 or done == s.stop_at
        if evaluating or saving:
            report(*pending)
            pending = None
        if evaluating:
            results = evaluate(state)
            writer.write(done, results, prefix="eval")
            writer.print(
                f"eval @ step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items())
            )
        stopping = evaluating and should_stop is not None and should_stop()
        if saving or stopping:
            checkpointer.save(done, state, meta_at(done))
        if stopping:
            writer.print(f"stopping early at step {done}")
            break
        if evaluating or saving:
            window.clear()
            window_start = time.perf_counter()
    if pending is not None:
        report(*pending)
    checkpointer.wait()
    return state


def run_mesh(cfg: Config) -> Mesh:
    """The mesh `cfg.mesh` asks for, once the config is checked against this machine's devices."""
    check_training_mesh(cfg, jax.device_count())
    return make_mesh(cfg.mesh)


@dataclass
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
