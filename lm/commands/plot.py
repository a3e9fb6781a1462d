"""`lm plot`: training curves of one or more runs, overlaid, as a PNG (the `[plot]` extra)."""

from __future__ import annotations

from collections.abc import Sequence

from etils import epath

from lm.train.curves import CURVES_FILE, plot_runs


def plot(run_dirs: Sequence[str], out: str | None = None) -> str:
    """Draw the runs' loss, learning rate, gradient norm and tokens/s against step into `out`
    (default: `RUN/curves.png` for one run, `curves.png` here for several); returns a summary."""
    if not run_dirs:
        raise ValueError("No run given; pass one or more run directories.")
    default = epath.Path(run_dirs[0]) / CURVES_FILE if len(run_dirs) == 1 else CURVES_FILE
    path = plot_runs(run_dirs, out or default)
    runs = "1 run" if len(run_dirs) == 1 else f"{len(run_dirs)} runs"
    return f"{path}: curves of {runs}"
