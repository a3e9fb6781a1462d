"""Side-by-side train throughput: `lm bench` vs Hugging Face PyTorch GPT-2, alternating runs.

Runs each side `--rounds` times, interleaved so both see the same machine load, and prints the
median tokens/s of each and their ratio. Needs the project venv (.venv) and the torch venv
(benchmarks/.venv-torch, see benchmarks/README.md).

    .venv/bin/python benchmarks/compare_train.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def last_json(command: list[str]) -> dict:
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--config", default="configs/bench_cpu.yaml")
    args = parser.parse_args()
    sides = {
        "lm (JAX/NNX)": [
            str(ROOT / ".venv/bin/lm"),
            "bench",
            "--config",
            args.config,
            "--steps",
            str(args.steps),
        ],
        "torch eager": [
            str(ROOT / "benchmarks/.venv-torch/bin/python"),
            "benchmarks/torch_gpt2.py",
            "train",
            "--steps",
            str(args.steps),
        ],
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    mfus: list[float] = []
    for _ in range(args.rounds):
        for name, command in sides.items():
            result = last_json(command)
            rates[name].append(result["tokens_per_s"])
            if "mfu" in result:  # lm's side reports it
                mfus.append(result["mfu"])
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, values in rates.items():
        print(f"{name:14s} median {medians[name]:8.0f} tokens/s  runs {[round(v) for v in values]}")
    lm, torch = medians["lm (JAX/NNX)"], medians["torch eager"]
    print(f"ratio lm / torch = {lm / torch:.2f}")
    print(f"lm MFU median {statistics.median(mfus):.3f}  runs {[round(m, 3) for m in mfus]}")


if __name__ == "__main__":
    main()
