"""Optional Weights & Biases logging (`train.wandb`): the scalars `MetricsWriter` writes to
metrics.jsonl, also sent to a wandb run. The `wandb` package is imported only when a run asks
for it; `lm.config.check_pretraining` / `check_finetuning` refuse such a run without it."""

from __future__ import annotations

import secrets

from etils import epath

# Kept in the run dir: a resumed run continues the same wandb run instead of starting another.
RUN_ID_FILE = "wandb_run_id"


class WandbLog:
    """One wandb run for `run_dir`, opened at the first `log`; process 0 only (as the writer)."""

    def __init__(self, project: str, run_dir: epath.Path, config: dict | None = None):
        entity, _, name = project.rpartition("/")  # "entity/project" or "project"
        self.entity, self.project = entity or None, name
        self.run_dir = run_dir
        self.config = config or {}
        self._run = None

    def _open(self):
        import wandb

        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        local = not str(self.run_dir).startswith(("gs://", "s3://"))  # wandb writes local files
        return wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            config=self.config,
            dir=str(self.run_dir) if local else None,
        )

    def log(self, step: int, record: dict[str, float]) -> None:
        """Log `record` (metrics.jsonl keys such as train/loss, without "step") at `step`."""
        if self._run is None:
            self._run = self._open()
        self._run.log(record, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
