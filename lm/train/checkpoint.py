"""Orbax checkpoints: async saves of the train state plus JSON metadata; restore onto any mesh.

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the newest one: incomplete saves are never read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from lm.config import CheckpointConfig
from lm.train.state import abstract_with_shardings


class Checkpointer:
    """Saves and restores `TrainState` with metadata (config, data position) under `directory`."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = _absolute(epath.Path(directory))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep,
                enable_async_checkpointing=cfg.async_save,
                create=True,
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


def _absolute(path: epath.Path) -> epath.Path:
    """Local paths made absolute (Orbax needs it); gs:// and other remote URIs as they are."""
    return path if "://" in os.fspath(path) else path.absolute()


def abstract_of(tree: Any) -> Any:
    """ShapeDtypeStructs of a concrete tree (the restore target's shapes)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
