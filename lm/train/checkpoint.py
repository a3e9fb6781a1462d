"""Orbax checkpoints: async saves of the train state plus JSON metadata; restore onto any mesh.

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the newest one: incomplete saves are never read.
A checkpoint damaged after it was written (truncated or missing files) is moved aside to
`<step>.corrupt-<time>`, a name Orbax does not list, and the next older one is restored. A save
that fails (disk full, unwritable directory) raises `CheckpointSaveError`: training stops with
the older checkpoints kept.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lm.config import CheckpointConfig, Config, to_dict
from lm.tasks import task_for
from lm.train.state import TrainState, abstract_with_shardings

LOWER_IS_BETTER = frozenset({"loss", "mse"})
# Files every finalized step directory holds: the state's tree metadata and OCDBT manifest,
# and the JSON metadata.
REQUIRED_FILES = ("state/_METADATA", "state/manifest.ocdbt", "meta/metadata")
# OS reasons a save fails for, as they appear in Orbax's and TensorStore's messages.
_OS_REASONS = tuple(
    os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)
)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable directory); training stops."""

    exit_code = 2  # a problem the user fixes (space, permissions), like a usage error


class NoUsableCheckpoint(ValueError):
    """A run has checkpoints, but none of them restores."""


def checkpoint_meta(cfg: Config, step: int) -> dict:
    """The metadata saved with a training checkpoint: its step, data position and config."""
    position = {"next_step": step, "seed": cfg.data.seed, "batch": cfg.data.batch_size}
    return {"step": step, "data_position": position, "config": to_dict(cfg)}


class Checkpointer:
    """Saves and restores `TrainState` with metadata (config, data position) under `directory`.

    `barrier_prefix` names this manager's cross-process barriers: Orbax keys them by step
    alone, so two managers saving the same step at once in a multi-process run (the train
    checkpoint and the best one) would collide on them unless one has a prefix.
    """

    def __init__(
        self, directory: str | Path, cfg: CheckpointConfig, barrier_prefix: str | None = None
    ):
        self.directory = absolute(epath.Path(directory))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep,
                enable_async_checkpointing=cfg.async_save,
                create=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=barrier_prefix
                ),
            ),
            item_names=("state", "meta"),
        )
        self.in_flight: int | None = None  # the step of a save not yet known to be complete

    def latest_step(self) -> int | None:
        """The newest complete checkpoint: a save still being written (or failed) is not one."""
        steps = [s for s in self.manager.all_steps() if s != self.in_flight or self._complete(s)]
        return max(steps, default=None)

    def _complete(self, step: int) -> bool:
        path = self.directory / str(step)
        return path.exists() and ocp.step.is_path_finalized(path)

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Start saving (async); returns False if this step was already saved.

        Raises CheckpointSaveError if the previous save or this one fails.
        """
        self.wait()
        if step in self.manager.all_steps():
            return False
        try:
            started = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )
        except Exception as error:  # TensorStore reports I/O failures as ValueError or Exception
            raise self._save_error(step, error) from error
        self.in_flight = step
        return started

    def check(self) -> None:
        """Raise CheckpointSaveError if an async save has already failed; never blocks."""
        if self.in_flight is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def _save_error(self, step: int, error: Exception) -> CheckpointSaveError:
        text = str(error)
        reason = next((r for r in _OS_REASONS if r in text), None)
        if reason is None:
            reason = text.splitlines()[0][:200] if text else type(error).__name__
        last = max((s for s in self.manager.all_steps() if s != step), default=None)
        kept = "no older checkpoint exists"
        if last is not None:
            kept = f"older checkpoints are kept (newest: step {last})"
        return CheckpointSaveError(
            f"Saving the checkpoint of step {step} in {self.directory} failed ({reason}); "
            f"training stopped and {kept}: free space or fix the directory's permissions, then "
            "rerun to resume."
        )

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict]:
        """(state placed on `shardings`, metadata) of checkpoint `step`, whatever mesh wrote it."""
        target = abstract_with_shardings(abstract_state, shardings)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def restore_newest(
        self, abstract_state: Any, shardings: Any, say: Callable[[str], None]
    ) -> tuple[Any, dict, int] | None:
        """(state, metadata, step) of the newest checkpoint that restores; None if there are none.

        Process 0 moves visibly broken checkpoints aside (see `set_aside_broken`) and every
        process then lists what is left. With one process, a checkpoint whose restore fails
        while an older one restores is corrupt too and is moved aside; if none restores, the
        config rather than the files may be at fault, so nothing is moved and
        NoUsableCheckpoint says why. Several processes restore collectively and cannot agree
        on a fallback, so there a failing restore raises NoUsableCheckpoint.
        """
        moved = self.set_aside_broken(say) if jax.process_index() == 0 else 0
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("lm_checkpoint_set_aside")
        self.manager.reload()
        failures: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, abstract_state, shardings)
            except Exception as error:  # TensorStore raises bare Exceptions for unreadable data
                if jax.process_count() > 1:
                    raise NoUsableCheckpoint(
                        f"Checkpoint {step} in {self.directory} does not restore "
                        f"({_one_line(error)}); a run of several processes cannot fall back on "
                        f"its own: rename it to {step}.corrupt and rerun."
                    ) from error
                failures.append((step, _one_line(error)))
                continue
            for bad, reason in failures:
                say(f"checkpoint {bad} does not restore ({reason}); {self._set_aside(bad)}")
            return state, meta, step
        if failures:
            step, reason = failures[0]
            raise NoUsableCheckpoint(
                f"Checkpoint {step} in {self.directory} does not restore ({reason}) and no older "
                "one does either; rerun with the config this run was trained with, or move the "
                "checkpoints aside to start afresh."
            )
        if moved:
            raise NoUsableCheckpoint(
                f"Every checkpoint in {self.directory} is corrupt and was moved aside "
                "(<step>.corrupt-<time>); rerun to start the run afresh, or put back a copy "
                "from a backup to resume it."
            )
        return None

    def set_aside_broken(self, say: Callable[[str], None]) -> int:
        """Move every checkpoint with missing or empty files aside, saying why; returns how many."""
        moved = 0
        for step in self.manager.all_steps():
            problem = checkpoint_problem(self.directory / str(step))
            if problem is not None:
                say(f"checkpoint {step} is corrupt ({problem}); {self._set_aside(step)}")
                moved += 1
        return moved

    def _set_aside(self, step: int) -> str:
        """Rename checkpoint `step` out of Orbax's sight (never delete it); says where to."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.directory / f"{step}.corrupt-{stamp}"
        copy = 1
        while target.exists():
            copy += 1
            target = self.directory / f"{step}.corrupt-{stamp}-{copy}"
        (self.directory / str(step)).rename(target)
        return f"moved it to {target}"

    def wait(self) -> None:
        """Block until the save in flight is complete; CheckpointSaveError if it failed."""
        step, self.in_flight = self.in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # the async save's own exception, re-raised by Orbax
            raise self._save_error(step, error) from error

    def close(self) -> None:
        self.wait()
        self.manager.close()


class BestCheckpoint:
    """Keeps the params of the best evaluation in `directory/checkpoints`.

    Also counts evaluations since the last improvement, for early stopping; both survive a
    restart through `directory/best.json`.
    """

    def __init__(self, directory: epath.Path, cfg: Config):
        self.directory = directory
        f = cfg.finetune
        self.metric = f.metric or task_for(cfg).metrics[0]
        self.sign = -1.0 if self.metric in LOWER_IS_BETTER else 1.0
        self.patience = f.patience
        self.record = {"metric": self.metric, "step": None, "value": None, "stale": 0}
        if (self.directory / "best.json").is_file():
            self.record = json.loads((self.directory / "best.json").read_text())
        self.checkpointer = Checkpointer(
            self.directory / "checkpoints", dataclasses.replace(cfg.checkpoint, keep=1), "best"
        )

    def update(self, step: int, state: TrainState, results: dict[str, float]) -> None:
        """Save `state`'s params if `results` improve on the best so far."""
        value = results[self.metric]
        best = self.record["value"]
        if best is None or self.sign * value > self.sign * best:
            self.checkpointer.save(step, TrainState(state.step, state.params, {}), {"step": step})
            self.record.update(step=step, value=value, stale=0)
        else:
            self.record["stale"] += 1
        if jax.process_index() == 0:
            (self.directory / "best.json").write_text(json.dumps(self.record, indent=2))

    def should_stop(self) -> bool:
        return bool(self.patience) and self.record["stale"] >= self.patience

    def close(self) -> None:
        self.checkpointer.close()


def checkpoint_problem(step_dir: epath.Path) -> str | None:
    """What is visibly wrong with a step directory (missing or empty files), or None."""
    if not step_dir.is_dir():
        return "not a directory"
    files = [folder / name for folder, _, names in step_dir.walk() for name in names]
    if not files:
        return "the directory is empty"
    for name in REQUIRED_FILES:
        if not (step_dir / name).exists():
            return f"{name} is missing"
    for shard in (step_dir / "state").glob("ocdbt.process_*"):
        if not (shard / "manifest.ocdbt").exists():
            return f"state/{shard.name}/manifest.ocdbt is missing"
    for path in files:
        if path.stat().length == 0:
            return f"{os.fspath(path)[len(os.fspath(step_dir)) + 1 :]} is empty"
    return None


def _one_line(error: Exception) -> str:
    """An exception as a short line (TensorStore's messages run to pages)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first[:160]}"


def absolute(path: epath.Path) -> epath.Path:
    """Local paths made absolute (Orbax needs it); gs:// and other remote URIs as they are."""
    return path if "://" in os.fspath(path) else path.absolute()
