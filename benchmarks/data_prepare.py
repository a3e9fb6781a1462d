"""Prepared data at two corpus sizes: prepare throughput, read throughput, and `lm pretrain`'s
peak RSS and time to first step on 5 MB vs 100 MB (issue 15's targets: ratios <= 1.15).

The corpora are the Shakespeare demo's documents written as .txt files, the large one repeated
with a distinct first line per copy (so every document differs). Everything lands in --work.

    .venv/bin/python benchmarks/data_prepare.py --work /tmp/lm_prepare_bench
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

from lm.config import load_config, to_dict
from lm.data.batches import StepBatcher
from lm.data.prepared import PreparedData, load_prepared_data
from lm.data.shakespeare import shakespeare_documents
from lm.data.tokenizer import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def write_corpus(directory: pathlib.Path, copies: int) -> int:
    """Shakespeare's documents `copies` times as .txt files; returns the bytes written."""
    if directory.is_dir():
        return sum(p.stat().st_size for p in directory.rglob("*.txt"))
    docs = [d for split in ("train", "validation") for d in shakespeare_documents(split)]
    total = 0
    for copy in range(copies):
        folder = directory / f"copy{copy:03d}"
        folder.mkdir(parents=True)
        for i, doc in enumerate(docs):
            text = f"Copy {copy}, document {i}.\n{doc}"
            (folder / f"{i:04d}.txt").write_text(text)
            total += len(text.encode())
    return total


def prepare_timed(corpus: pathlib.Path, out: pathlib.Path, tokenizer: str, workers: int) -> dict:
    """Tokens/s of `lm data prepare` on `corpus` afresh, the CPU seconds it took (it and its
    workers) and the load average before it (other users of the machine slow it down)."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    command = [
        *(sys.executable, "-m", "lm", "data", "prepare", "--workers", str(workers)),
        *(f"data.source={corpus}", f"data.prepared={out}", f"data.tokenizer={tokenizer}"),
        *("data.validation_fraction=0.05", "model.vocab_size=2048"),
    ]
    load, cpu = os.getloadavg()[0], _cpu_seconds()
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    return {
        "workers": workers,
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds() - cpu,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "load_before": load,
    }


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def read_throughput(prepared: pathlib.Path, seq_len: int, batch: int, steps: int) -> dict:
    """Tokens/s of one process reading its rows of global batches (1 of 1, 1 of 4 processes)."""
    rows = PreparedData(prepared).rows("train", seq_len, "pack")
    batcher = StepBatcher(rows, batch, seed=0)
    result = {}
    for processes in (1, 4):
        batcher.local_batch(0, 0, processes)  # open the shards
        start = time.perf_counter()
        for step in range(1, steps + 1):
            local = batcher.local_batch(step, 0, processes)
        seconds = time.perf_counter() - start
        tokens = steps * len(local["inputs"]) * seq_len
        result[f"of_{processes}"] = tokens / seconds
    return result


def data_start(work: pathlib.Path, name: str) -> float:
    """Seconds `lm pretrain` spends on prepared data before its first step (the part of its
    start-up that could grow with the corpus): open both splits, make the first batch."""
    cfg = load_config(
        ROOT / "configs" / "shakespeare.yaml",
        [f"data.source={work / f'corpus_{name}'}", f"data.prepared={work / f'prepared_{name}_w2'}"],
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        data = load_prepared_data(cfg.data, run_dir, cfg.model.vocab_size)
        data.train.local_batch(0)
    return time.perf_counter() - start


def first_step(config: pathlib.Path, run_dir: pathlib.Path) -> dict:
    """Seconds from `lm pretrain`'s start to its first metrics line, and its peak RSS then."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lm", "pretrain", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics, peak_kib = run_dir / "metrics.jsonl", 0
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):
            status = pathlib.Path(f"/proc/{proc.pid}/status").read_text()
            peak_kib = int(status.split("VmHWM:")[1].split()[0])
            if proc.poll() is not None:
                raise RuntimeError(f"lm pretrain exited with {proc.returncode} before a step")
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        status = pathlib.Path(f"/proc/{proc.pid}/status").read_text()
        peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return {"seconds": seconds, "peak_rss_mib": peak_kib / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/lm_prepare_bench")
    parser.add_argument("--copies", type=int, default=20, help="the large corpus: × Shakespeare")
    parser.add_argument("--repeats", type=int, default=3, help="pretrain starts per size")
    parser.add_argument("--only", choices=("prepare", "read", "pretrain"), help="one part")
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    sizes = {"small": 1, "large": args.copies}
    for name, copies in sizes.items():
        results[f"{name}_bytes"] = write_corpus(work / f"corpus_{name}", copies)
    tokenizer = work / "tokenizer.model"
    if not tokenizer.is_file():
        train_tokenizer(shakespeare_documents("train"), tokenizer, 2048)

    if args.only in (None, "prepare"):
        # Prepare throughput: each corpus afresh with 1 and with 2 worker processes, alternating,
        # best of --repeats each (other users of a shared machine only ever slow a run down).
        for name in ("small", "large"):
            for workers in (1, 2):
                results[f"prepare_{name}_w{workers}"] = []
            for _ in range(args.repeats):
                for workers in (1, 2):
                    out = work / f"prepared_{name}_w{workers}"
                    measured = prepare_timed(work / f"corpus_{name}", out, str(tokenizer), workers)
                    results[f"prepare_{name}_w{workers}"].append(measured)
                    print(name, json.dumps(measured), flush=True)
            best = {
                w: min(results[f"prepare_{name}_w{w}"], key=lambda m: m["seconds"]) for w in (1, 2)
            }
            results[f"prepare_{name}_best_tokens_per_s"] = {
                w: m["tokens_per_s"] for w, m in best.items()
            }
            results[f"prepare_{name}_speedup"] = best[1]["seconds"] / best[2]["seconds"]
    if args.only in (None, "read"):
        large = work / "prepared_large_w2"
        results["read_tokens_per_s"] = read_throughput(large, seq_len=1024, batch=64, steps=50)
        print(json.dumps(results["read_tokens_per_s"]), flush=True)
        for name in ("small", "large"):
            data_start(work, name)  # warm: imports, page cache
            results[f"data_start_{name}_s"] = float(
                np.median([data_start(work, name) for _ in range(5)])
            )
        print(json.dumps({k: v for k, v in results.items() if k.startswith("data_start")}))
    if args.only not in (None, "pretrain"):
        print(json.dumps(results, indent=2))
        return

    # Time to first step and peak RSS of `lm pretrain` (the demo model) on each prepared size,
    # alternating sizes so that other load on the machine weighs on both alike.
    demo = load_config(ROOT / "configs" / "shakespeare.yaml", [])
    runs: dict[str, list[dict]] = {"small": [], "large": []}
    for repeat in range(args.repeats + 1):  # the first round warms the compilation cache
        for name in ("small", "large"):
            run_dir = work / f"run_{name}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            tree = to_dict(demo)
            tree["data"] |= {
                "source": str(work / f"corpus_{name}"),
                "prepared": str(work / f"prepared_{name}_w2"),
                "validation_fraction": 0.05,
            }
            tree["train"] |= {"run_dir": str(run_dir), "log_every": 1, "steps": 50}
            config = work / f"pretrain_{name}.yaml"
            config.write_text(yaml.safe_dump(tree))
            measured = first_step(config, run_dir)
            print(name, json.dumps(measured), flush=True)
            if repeat:
                runs[name].append(measured)
    for name, measured in runs.items():
        results[f"pretrain_{name}"] = {
            key: float(np.median([r[key] for r in measured])) for key in measured[0]
        }
    for key in ("seconds", "peak_rss_mib"):
        results[f"ratio_{key}"] = results["pretrain_large"][key] / results["pretrain_small"][key]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
