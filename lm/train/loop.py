"""The run skeleton shared by pretrain, finetune and bench, and the training loop it runs.

`run_mesh` → `start_session` (the newest checkpoint restored, or fresh sharded state) →
`Session.train`: the one train step for the command's objective, fed this process's rows of
each step's batch, through `run_loop`. Commands supply only what differs: data, objective,
evaluation. `run_loop` itself knows nothing about objectives or meshes: it calls
`train_step(state, batch)` on `batch_at(step)` and treats the returned metrics as opaque
scalars: steps, one-step-late metrics, evaluation, checkpoints, stopping on signals.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lm.config import Config, check_training_mesh
from lm.model.build import build_model
from lm.runtime.distributed import preemption_sync_point
from lm.runtime.flops import train_flops_per_token
from lm.runtime.mesh import batch_sharding, make_mesh, to_global
from lm.train.checkpoint import Checkpointer, checkpoint_meta
from lm.train.metrics import MetricsWriter
from lm.train.preemption import Preempted, StopSignals
from lm.train.state import TrainState, plan_train_state
from lm.train.step import make_train_step


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


class RunWriteError(RuntimeError):
    """A file of the run (metrics, TensorBoard events) could not be written; training stops."""

    exit_code = 2  # a problem the user fixes (space, permissions), like a usage error


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
    uniform_loss: float | None = None  # ln(vocab_size): the loss of predicting all tokens alike

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
            uniform_loss=math.log(cfg.model.vocab_size),
        )


class Throughput:
    """Tokens/s and MFU over the steps reported since the last `rates()`.

    A step is timed from when it could start to when its metrics are fetched (it is known
    done). It starts once dispatched and once the step before it finished: when fetching that
    one's metrics had to wait, it finished then; otherwise only the dispatch time is known. So
    host time spent logging while the device runs the next step is never taken off a step, a
    reported rate is never above the real one, and pauses (evaluation, checkpoints) between a
    fetch and the next dispatch are left out.
    """

    def __init__(self, settings: LoopSettings):
        self.settings = settings
        self.busy_s = 0.0
        self.steps = 0
        self.last_done = time.perf_counter()
        self._dispatched: dict[int, float] = {}

    def dispatching(self, step: int) -> None:
        self._dispatched[step] = time.perf_counter()

    def step_done(self, step: int, waited: bool) -> None:
        """`step`'s metrics are fetched; `waited`: they were not ready when asked for."""
        now = time.perf_counter()
        dispatched = self._dispatched.pop(step)
        start = max(dispatched, self.last_done) if waited else dispatched
        self.busy_s += now - start
        self.steps += 1
        self.last_done = now

    def rates(self) -> dict[str, float]:
        s, seconds = self.settings, max(self.busy_s, 1e-9)
        rates = {
            "tokens_per_s": s.tokens_per_step * self.steps / seconds,
            "mfu": s.flops_per_step * self.steps / seconds / s.peak_flops,
        }
        self.busy_s, self.steps = 0.0, 0
        return rates


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
    validation metric); the state at that step is checkpointed first. SIGTERM or Ctrl-C end
    it after the current step (in a multi-host run: the step all processes agree on), which is
    checkpointed before `Preempted` is raised.

    Metrics of step N are fetched after step N+1 is dispatched, so the host never stalls the
    device. Before each checkpoint the pending metrics are checked, so a diverged state is
    never saved; divergence raises TrainingDiverged naming the step and last good checkpoint.
    Every exit waits for checkpoint saves in flight, except a second Ctrl-C, which exits at
    once, abandoning them (Orbax never reads an unfinished save).
    """
    s = settings
    window: list[dict[str, float]] = []
    throughput = Throughput(s)
    pending: tuple[int, dict] | None = None
    warned_uniform = False

    def diverged(what: str, value: float, step: int, fix: str) -> TrainingDiverged:
        checkpointer.wait()  # name only a checkpoint that finished saving
        last = checkpointer.latest_step()
        where = f"step {last} in {checkpointer.directory}" if last is not None else "none"
        return TrainingDiverged(
            f"{what} became {value} at step {step}; last good checkpoint: {where}. {fix}"
        )

    def report(step: int, metrics: dict, flush: bool = False) -> None:
        nonlocal warned_uniform
        waited = not all(_ready(x) for x in jax.tree.leaves(metrics))
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        throughput.step_done(step, waited)
        if not math.isfinite(values["loss"]):
            fix = "Lower optim.lr, raise optim.warmup_steps or set optim.clip_norm, then rerun."
            raise diverged("Loss", values["loss"], step, fix)
        grad_norm = values.get("grad_norm")
        if grad_norm is not None and not math.isfinite(grad_norm):
            fix = (
                "Set optim.clip_norm or lower optim.lr, and look for inf or NaN in the inputs "
                "(model.dtype=float32 rules out bfloat16 overflow), then rerun."
            )
            raise diverged("Gradient norm", grad_norm, step, fix)
        if not warned_uniform and grad_norm == 0.0 and _is_uniform(values["loss"], s):
            warned_uniform = True
            writer.print(
                f"warning: at step {step} the loss is {values['loss']:.4f} = ln(vocab_size) "
                "and the gradient norm is 0: the model predicts every token alike and is not "
                "learning; check that the weights are not initialised to zero and that not "
                "every parameter is frozen."
            )
        window.append(values)
        if step % s.log_every and step != s.stop_at and not flush:
            return
        means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        means.update(throughput.rates())
        writer.write(step, means)
        writer.progress(step, means, step - start_step)
        window.clear()

    writer.resume_at(start_step)  # what a killed run logged past its checkpoint comes again
    with StopSignals(preemption_sync_point()) as signals, _saves_settled(checkpointer, writer):
        for step in range(start_step, s.stop_at):
            batch = batch_at(step)
            throughput.dispatching(step + 1)
            state, metrics = train_step(state, batch)
            checkpointer.check()  # an async save that failed stops the run now, not a save later
            if pending is not None:
                report(*pending)
            done = step + 1
            pending = (done, metrics)
            stop_signal = signals.requested(done)
            # A stop for a signal saves at once: an evaluation due at this step is skipped.
            due = done % s.eval_every == 0 or done == s.total_steps
            evaluating = evaluate is not None and stop_signal is None and due
            saving = done % s.checkpoint_every == 0 or done == s.stop_at
            if evaluating or saving or stop_signal is not None:
                report(*pending, flush=stop_signal is not None)
                pending = None
            if evaluating:
                results = evaluate(state)
                writer.write(done, results, prefix="eval")
                writer.print(
                    f"eval @ step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items())
                )
            stopping = evaluating and should_stop is not None and should_stop()
            if saving or stopping or stop_signal is not None:
                checkpointer.save(done, state, meta_at(done))
            if stop_signal is not None:
                checkpointer.wait()
                raise Preempted(stop_signal, done, str(checkpointer.directory))
            if stopping:
                writer.print(f"stopping early at step {done}")
                break
        if pending is not None:
            report(*pending)
        checkpointer.wait()
    return state


def _ready(value: Any) -> bool:
    """Whether a metric is computed (host values, which have no `is_ready`, always are)."""
    return value.is_ready() if hasattr(value, "is_ready") else True


def _is_uniform(loss: float, settings: LoopSettings) -> bool:
    """Whether `loss` is that of predicting every token alike (ln(vocab_size))."""
    return settings.uniform_loss is not None and math.isclose(
        loss, settings.uniform_loss, rel_tol=1e-3
    )


@contextlib.contextmanager
def _saves_settled(checkpointer: Checkpointer, writer: MetricsWriter) -> Iterator[None]:
    """On an error out of the block, first wait for checkpoint saves in flight, so that each
    ends whole. A run file that cannot be written (a full disk may refuse the metrics before
    a checkpoint) becomes `RunWriteError` naming the newest checkpoint kept."""
    try:
        yield
    except Exception as error:
        try:
            checkpointer.wait()
        except Exception as second:  # the error already on its way out is the one to raise
            writer.print(f"the checkpoint save in flight failed as well: {second}")
        if isinstance(error, OSError):
            raise _write_error(error, checkpointer) from error
        raise


def _write_error(error: OSError, checkpointer: Checkpointer) -> RunWriteError:
    last = checkpointer.latest_step()
    kept = "no checkpoint exists yet"
    if last is not None:
        kept = f"older checkpoints are kept (newest: step {last})"
    where = f" {error.filename}" if error.filename else " a file of the run"
    return RunWriteError(
        f"Writing{where} failed ({error.strerror or error}); training stopped and {kept}: "
        "free space or fix the directory's permissions, then rerun to resume."
    )


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
    """The newest good checkpoint of `checkpointer` restored onto `mesh` (a resume; corrupt
    newer ones are moved aside), else freshly initialised sharded state, passed through `fresh`
    (e.g. to copy in a pretrained backbone). Call under `jax.set_mesh(mesh)`."""
    graphdef, abstract, shardings, init = plan_train_state(
        lambda rngs: build_model(cfg, rngs), tx, mesh, cfg.train.seed
    )
    say = writer.print if writer is not None else print
    restored = (
        checkpointer.restore_newest(abstract, shardings, say) if checkpointer is not None else None
    )
    if restored is not None:
        state, _, start = restored
        say(f"resumed from step {start} ({checkpointer.directory})")
    else:
        start = 0
        state = init()
        if fresh is not None:
            state = fresh(state)
    return Session(cfg, mesh, tx, graphdef, shardings, state, start)
