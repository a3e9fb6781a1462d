"""The demo config runs end to end through the `lm` command in a temporary run dir."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import FAST_COMPILE_XLA_FLAGS

ROOT = Path(__file__).resolve().parent.parent


def test_demo_config_pretrains_end_to_end_through_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    # This run executes more than it compiles (its final eval reads all 1,135 validation rows
    # of the demo model): XLA's default optimizations pay for themselves here.
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE_XLA_FLAGS
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm",
            "pretrain",
            "--config",
            str(ROOT / "configs/shakespeare.yaml"),
            f"train.run_dir={run_dir}",
            f"data.data_dir={tmp_path / 'tfds'}",
            "train.steps=4",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.log_every=1",
            "checkpoint.every=2",
            "train.sample_tokens=16",
            "data.batch_size=16",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "step 4/4" in out and "eval @ step 2" in out
    assert "bits-per-byte" in out and "sample:\nROMEO:\n" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert all(
        r["train/tokens_per_s"] > 0 and r["train/mfu"] > 0 for r in records if "train/mfu" in r
    )
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert 0 < final["bits_per_byte"] < 8
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
    assert any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "tokenizer.model").is_file() and (run_dir / "config.yaml").is_file()
