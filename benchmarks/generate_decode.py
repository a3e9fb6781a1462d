"""Decode throughput of `Generator` (KV cache, greedy) for the benchmark shape.

Random weights of `configs/bench_cpu.yaml` (GPT-2 shape: d_model 256, 4 layers, vocab 16384),
random prompts of --prompt-len tokens, exactly --max-new-tokens new tokens per row (EOS is made
unreachable), one untimed warm-up run (it compiles), then the median of --repeats timed runs.
Compare with `benchmarks/torch_gpt2.py decode` using the same batch, prompt and new tokens.
Also counts the compilations a 20-prompt session of mixed prompt lengths triggers.

The last line printed is one JSON object with all settings and numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/bench_cpu.yaml")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="1 = single-threaded XLA (0 = all)")
    args = p.parse_args()
    if args.threads == 1:  # must be set before JAX starts
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )

    import jax
    import numpy as np
    from flax import nnx

    from lm.config import load_config
    from lm.data.tokenizer import EOS_ID
    from lm.inference.generator import Generator
    from lm.model import Transformer

    load_start = os.getloadavg()[0]
    cfg = load_config(args.config, [])
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    # A zero unembedding row gives EOS logit 0, below the maximum of 16k random logits: every
    # row then decodes all --max-new-tokens, as torch_gpt2.py's min_new_tokens forces.
    unembed = model.unembed if not cfg.model.tie_embeddings else model.embed
    unembed[...] = unembed[...].at[EOS_ID].set(0.0)
    generator = Generator(model, None, max_len=args.prompt_len + args.max_new_tokens)
    rng = np.random.default_rng(0)
    prompts = rng.integers(7, cfg.model.vocab_size, (args.batch, args.prompt_len)).tolist()

    def run() -> float:
        start = time.perf_counter()
        out = generator.generate_ids(prompts, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
        assert all(len(c.tokens) == args.max_new_tokens for c in out), "a row stopped early"
        return seconds

    warmup_s = run()
    times = [run() for _ in range(args.repeats)]
    med = statistics.median(times)
    new_tokens = args.batch * args.max_new_tokens

    session = Generator(model, None, max_len=cfg.model.max_seq_len)
    for n in rng.integers(1, 200, 20):
        session.generate_ids([[7] * int(n)], max_new_tokens=32)

    print(
        f"lm decode batch={args.batch} prompt={args.prompt_len} new={args.max_new_tokens}: "
        f"median {med:.3f} s, {new_tokens / med:,.0f} new tokens/s "
        f"({args.max_new_tokens / med:,.1f} tokens/s per sequence), warmup {warmup_s:.2f} s; "
        f"a 20-prompt session of lengths 1-199 compiled {session.compiles} times"
    )
    record = {
        "bench": "lm_generate",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "threads": args.threads or os.cpu_count(),
        "loadavg_1m_start": load_start,
        "jax": jax.__version__,
        "warmup_s": warmup_s,
        "time_median_s": med,
        "step_time_median_s": med / args.max_new_tokens,
        "tokens_per_s": new_tokens / med,
        "session_20_prompts_compiles": session.compiles,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
