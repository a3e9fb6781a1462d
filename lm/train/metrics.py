"""Run logging: metrics.jsonl, TensorBoard events and a progress line (process 0 only)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
from etils import epath

from lm.train.wandb_log import WandbLog


def _summary_writer(logdir: str, purge_step: int | None):
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
    is installed only to accept torch tensors, which lm never writes, and that import costs
    3-5 s at every start of an `lm` command (torch's CUDA build, Python 3.12)."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter(logdir, purge_step=purge_step)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class MetricsWriter:
    """Writes scalars to `run_dir/metrics.jsonl` and TensorBoard, and shows progress.

    On a terminal the progress is one line rewritten in place; otherwise (logs, CI) each
    report is a plain line. Processes other than 0 write nothing. The files open at the first
    write, so that `resume_at` can drop what a resumed run will log again.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        stream=None,
        *,
        wandb: str = "",
        config: dict | None = None,
    ):
        """`wandb`: a Weights & Biases project to send the same scalars to ("" = off), with
        `config` (the run's, as a dict) recorded there."""
        self.enabled = jax.process_index() == 0
        self.run_dir = epath.Path(run_dir)  # local or gs://
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._jsonl = self._tb = None
        self._purge_step: int | None = None
        self._wandb = WandbLog(wandb, self.run_dir, config) if wandb and self.enabled else None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def resume_at(self, step: int) -> None:
        """Forget records of steps after `step`: a run resuming there logs them again.

        metrics.jsonl is rewritten without them (through a temporary file, so a crash leaves
        the old or the new file whole), and TensorBoard purges them (`purge_step`).
        Call before the first `write`.
        """
        if not self.enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            lines = path.read_text().splitlines()
            kept = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
            if len(kept) < len(lines):
                partial = self.run_dir / "metrics.jsonl.tmp"
                partial.write_text("".join(line + "\n" for line in kept))
                partial.replace(path)
        self._purge_step = step + 1

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
            self._tb = _summary_writer(str(self.run_dir / "tensorboard"), self._purge_step)
        record = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as error:  # name the file: a failed write() does not
            path = str(self.run_dir / "metrics.jsonl")
            raise OSError(error.errno, error.strerror, path) from error
        for key, value in scalars.items():
            self._tb.add_scalar(f"{prefix}/{key}", float(value), step)
        if self._wandb is not None:
            self._wandb.log(step, {k: v for k, v in record.items() if k != "step"})

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
        try:
            if self._jsonl is not None:
                self._jsonl.close()
                self._tb.close()
        finally:
            if self._wandb is not None:
                self._wandb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        """Close; a failure to flush (a full disk) never hides the error leaving the block."""
        try:
            self.close()
        except OSError:
            if error is None:
                raise
