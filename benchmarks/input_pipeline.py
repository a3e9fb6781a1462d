"""Input-pipeline throughput for a config: tokens/s of producing step-indexed global batches.

Compare against the train step's tokens/s (`lm bench --config ...`): the pipeline must be far
faster so the device never waits. Tokenizing and packing happen once at start (timed apart).

    .venv/bin/python benchmarks/input_pipeline.py --config configs/shakespeare.yaml
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax

from lm.config import load_config
from lm.data.pipeline import load_pretrain_data
from lm.runtime.mesh import batch_sharding, make_mesh, to_global


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shakespeare.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        data = load_pretrain_data(cfg.data, run_dir, cfg.model.vocab_size)
    setup_s = time.perf_counter() - start
    sharding = batch_sharding(make_mesh(cfg.mesh))
    start = time.perf_counter()
    for step in range(args.steps):
        batch = to_global(data.train.local_batch(step), sharding)
    jax.block_until_ready(batch)
    elapsed = time.perf_counter() - start
    tokens = args.steps * cfg.data.batch_size * cfg.data.seq_len
    result = {"setup_s": setup_s, "batches": args.steps, "tokens_per_s": tokens / elapsed}
    print(
        f"setup (documents, tokenizer, packing) {setup_s:.1f} s; "
        f"{tokens / elapsed:,.0f} tokens/s over {args.steps} batches"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
