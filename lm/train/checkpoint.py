"""Orbax checkpoints: async saves of the train state plus JSON metadata; restore onto any mesh.

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the newest one: incomplete saves are never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from lm.config import CheckpointConfig, Config, to_dict
from lm.tasks import task_for
from lm.train.state import TrainState, abstract_with_shardings

LOWER_IS_BETTER = frozenset({"loss", "mse"})


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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Start saving (async); returns False if this step was already saved."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
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


def absolute(path: epath.Path) -> epath.Path:
    """Local paths made absolute (Orbax needs it); gs:// and other remote URIs as they are."""
    return path if "://" in os.fspath(path) else path.absolute()
