"""Training curves: loss (train and validation), learning rate, gradient norm and tokens/s
against step, read from runs' `metrics.jsonl` and drawn with matplotlib (the `[plot]` extra).

matplotlib is imported only when a figure is drawn, so `lm` works without it: `lm plot` then
says to install the extra, and pretraining/fine-tuning skip their `RUN/curves.png`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import yaml
from etils import epath

from lm.config import from_dict

CURVES_FILE = "curves.png"


class MissingExtra(RuntimeError):
    """An optional package a command needs is not installed (the CLI: one sentence, exit 2)."""

    exit_code = 2


@dataclass
class RunCurves:
    """One run's series, each a list of (step, value) pairs, by metrics.jsonl key."""

    name: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    lr_from_schedule: bool = False  # `train/lr` is not logged: recomputed from config.yaml


# The panels of the figure: (title, y label, [(metrics.jsonl key, line style)], log y axis).
_PANELS = (
    ("loss", "nats/token", [("train/loss", "-"), ("eval/loss", "o--")], False),
    ("learning rate", "lr", [("train/lr", "-")], False),
    ("gradient norm", "global L2 norm", [("train/grad_norm", "-")], True),
    ("throughput", "tokens/s", [("train/tokens_per_s", "-")], False),
)


def matplotlib_installed() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def read_curves(run_dir: str | os.PathLike, name: str | None = None) -> RunCurves:
    """The series of `run_dir/metrics.jsonl` (local or gs://); lines cut short by a crash are
    skipped. Without a logged `train/lr`, the learning rate comes from the run's schedule."""
    run_dir = epath.Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no metrics.jsonl; pass the run_dir of an `lm pretrain` or "
            "`lm finetune` run that has logged at least one step."
        )
    curves = RunCurves(name or run_dir.name)
    latest: dict[str, dict[int, float]] = {}  # a resumed run's later line for a step wins
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (ValueError, KeyError, TypeError):
            continue
        for key, value in record.items():
            if isinstance(value, int | float):
                latest.setdefault(key, {})[step] = float(value)
    curves.series = {k: sorted(v.items()) for k, v in latest.items()}
    steps = [s for s, _ in curves.series.get("train/loss", [])]
    if "train/lr" not in curves.series and steps and (run_dir / "config.yaml").is_file():
        curves.series["train/lr"] = _scheduled_lr(run_dir, steps)
        curves.lr_from_schedule = True
    return curves


def _scheduled_lr(run_dir: epath.Path, steps: list[int]) -> list[tuple[int, float]]:
    """The learning rate of the update that ended each step from 1 to the last logged one (at
    most ~1000 points), from the run's config."""
    from lm.train.optim import learning_rate  # imports JAX: only when it is needed

    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    schedule = learning_rate(cfg.optim, cfg.train.steps)
    every = max(1, steps[-1] // 1000)
    at = np.array([*range(1, steps[-1], every), steps[-1]])
    rates = np.asarray(schedule(at - 1))  # step s logs update s - 1
    return [(int(s), float(r)) for s, r in zip(at, rates, strict=True)]


def _names(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Legend names: each run's directory name, its whole path where two names collide."""
    short = [epath.Path(r).name for r in run_dirs]
    return [s if short.count(s) == 1 else str(r) for s, r in zip(short, run_dirs, strict=True)]


def plot_runs(
    run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, dpi: int = 110
) -> epath.Path:
    """Draw the runs' curves overlaid (one colour per run) into the PNG `out` (local or
    gs://); returns its path. Panels whose metric no run logged say so."""
    if not matplotlib_installed():
        raise MissingExtra("lm plot needs matplotlib; install the extra: pip install 'lm[plot]'.")
    runs = [read_curves(r, n) for r, n in zip(run_dirs, _names(run_dirs), strict=True)]
    figure = draw(runs)
    out = epath.Path(out)
    buffer = io.BytesIO()  # savefig writes local files only; epath also writes gs://
    figure.savefig(buffer, format="png", dpi=dpi)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return out


def draw(runs: Sequence[RunCurves]):
    """A matplotlib Figure of 2 x 2 panels with every run's curves, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7.5), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, unit, keys, log_y) in zip(axes, _PANELS, strict=True):
        drawn = False
        for run, colour in zip(runs, colours, strict=True):
            for key, style in keys:
                points = run.series.get(key)
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                kind = key.split("/")[0].replace("eval", "validation")
                label = f"{run.name} {kind}" if len(keys) > 1 else run.name
                if key == "train/lr" and run.lr_from_schedule:
                    label += " (schedule)"
                ax.plot(steps, values, style, color=colour, label=label, markersize=3)
                drawn = True
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            continue
        values = [v for line in ax.get_lines() for v in line.get_ydata()]
        if log_y and min(values) > 0 and max(values) > 20 * min(values):  # spikes stay legible
            ax.set_yscale("log")
        if len(runs) > 1 or any(line.get_label() != runs[0].name for line in ax.get_lines()):
            ax.legend(fontsize="small")
    for ax in axes[2:]:
        ax.set_xlabel("step")
    return figure


def write_run_curves(run_dir: str | os.PathLike) -> epath.Path | None:
    """`run_dir/curves.png` at the end of a run, when matplotlib is installed (else None)."""
    if not matplotlib_installed():
        return None
    return plot_runs([run_dir], epath.Path(run_dir) / CURVES_FILE)
