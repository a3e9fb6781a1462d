"""Run logging: metrics.jsonl, TensorBoard events and a progress line (process 0 only)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
from etils import epath
from tensorboardX import SummaryWriter


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """Writes scalars to `run_dir/metrics.jsonl` and TensorBoard, and shows progress.

    On a terminal the progress is one line rewritten in place; otherwise (logs, CI) each
    report is a plain line. Processes other than 0 write nothing.
    """

    def __init__(self, run_dir: str | Path, total_steps: int, stream=None):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._jsonl = self._tb = None
        if self.enabled:
            run_dir = epath.Path(run_dir)  # local or gs://
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (run_dir / "metrics.jsonl").open("a")
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(f"{prefix}/{key}", float(value), step)

    def progress(self, step: int, scalars: dict[str, float], steps_done: int) -> None:
        """One progress report: step, loss, tokens/s, MFU and ETA."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(steps_done, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"loss {scalars['loss']:.4f}"] if "loss" in scalars else []
        parts += [f"{scalars['tokens_per_s']:,.0f} tok/s"] if "tokens_per_s" in scalars else []
        parts += [f"MFU {scalars['mfu'] * 100:.1f}%"] if "mfu" in scalars else []
        parts += [f"ETA {_fmt_duration(eta)}"]
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def print(self, message: str) -> None:
        """A message on its own line (ends a live progress line first)."""
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
