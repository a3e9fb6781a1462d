"""`lm convert from-hf | to-hf`: Hugging Face GPT-2 / Llama / BERT directories <-> run dirs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lm import interop


def from_hf(src: str, dst: str, overrides: Sequence[str] = (), overwrite: bool = False) -> str:
    """Import `src` into the run directory `dst` (empty unless `overwrite`, which replaces what
    is there); returns a one-line summary."""
    cfg = interop.from_hf(src, dst, overrides=overrides, overwrite=overwrite)
    m = cfg.model
    return (
        f"{dst}: imported {src} (d_model={m.d_model}, layers={m.num_layers}, "
        f"vocab={m.vocab_size}, objective={cfg.train.objective})"
    )


def to_hf(run_dir: str, dst: str) -> str:
    """Export the newest checkpoint of `run_dir` to `dst`; returns a one-line summary."""
    architecture = interop.to_hf(run_dir, dst)
    files = ", ".join(sorted(p.name for p in Path(dst).iterdir()))
    return f"{dst}: wrote {architecture} ({files})"
