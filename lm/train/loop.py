"""The shared training loop: steps, one-step-late metrics, evaluation, checkpoints.

The loop knows nothing about objectives or meshes: it calls `train_step(state, batch)` on
`batch_at(step)` and treats the returned metrics as opaque scalars.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from lm.config import Config
from lm.runtime.flops import train_flops_per_token
from lm.train.checkpoint import Checkpointer
from lm.train.metrics import MetricsWriter


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
