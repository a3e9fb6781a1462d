"""Reference CPU benchmark: Hugging Face PyTorch GPT-2, for side-by-side comparison with `lm bench`.

Runs in its own venv (see benchmarks/README.md), not the project's JAX venv.

Modes:
  train  (default) tokens/s of full training steps: forward + backward + AdamW(lr 1e-4) step,
         f32, random token batches, labels = inputs (HF shifts them internally).
  decode new tokens/s of `model.generate()` with the KV cache, greedy, never stopping early.

The last line printed is one JSON object with all settings and numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 16384


def make_model(seq: int) -> GPT2LMHeadModel:
    """Same shape as the lm project's small benchmark config (~11.6M params)."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=max(256, seq),
        n_embd=256,
        n_layer=4,
        n_head=4,
        n_inner=1024,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        loss_type="ForCausalLM",  # explicit: avoids a logger warning (a torch.compile graph break)
    )
    return GPT2LMHeadModel(config).float()


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.steps` training steps after `args.warmup` untimed ones."""
    model = make_model(args.seq)
    model.train()
    step_model: Any = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()  # forces completion of the step

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t0

    times: list[float] = []
    loss = float("nan")
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    med, mean = statistics.median(times), statistics.fmean(times)
    print(
        f"train batch={args.batch} seq={args.seq} compile={args.compile}: "
        f"step median {med * 1e3:.1f} ms, mean {mean * 1e3:.1f} ms, "
        f"{tokens / med:,.0f} tokens/s (median), warmup {warmup_s:.1f} s, loss {loss:.3f}"
    )
    return {
        "steps": args.steps,
        "warmup": args.warmup,
        "warmup_s": warmup_s,
        "step_time_median_s": med,
        "step_time_mean_s": mean,
        "tokens_per_s": tokens / med,
        "tokens_per_s_mean": tokens / mean,
        "final_loss": loss,
    }


@torch.inference_mode()
def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Time `model.generate()` (greedy, KV cache) for a random prompt; median of repeats."""
    model = make_model(args.prompt_len + args.max_new_tokens)
    model.eval()
    if args.compile:
        model.forward = torch.compile(model.forward)  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, VOCAB, (args.batch, args.prompt_len), generator=gen)
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(prompt),
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": 0,
    }

    def run() -> float:
        t = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        dt = time.perf_counter() - t
        new = out.shape[1] - args.prompt_len
        assert new == args.max_new_tokens, f"generated {new} tokens, not {args.max_new_tokens}"
        return dt

    warmup_s = run()
    times = [run() for _ in range(args.repeats)]
    med = statistics.median(times)
    new_tokens = args.batch * args.max_new_tokens
    print(
        f"decode batch={args.batch} prompt={args.prompt_len} new={args.max_new_tokens} "
        f"compile={args.compile}: median {med:.3f} s, {new_tokens / med:,.0f} new tokens/s "
        f"({args.max_new_tokens / med:,.1f} tokens/s per sequence), warmup {warmup_s:.2f} s"
    )
    return {
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "warmup_s": warmup_s,
        "time_median_s": med,
        "step_time_median_s": med / args.max_new_tokens,
        "tokens_per_s": new_tokens / med,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["train", "decode"], default="train")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="train sequence length")
    p.add_argument("--steps", type=int, default=20, help="timed train steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed train steps")
    p.add_argument("--compile", action="store_true", help="wrap the model with torch.compile")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-len", type=int, default=32, help="decode prompt length")
    p.add_argument("--max-new-tokens", type=int, default=128, help="decode new tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed decode runs (median)")
    args = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]  # other work on the machine skews CPU numbers; record it
    result = bench_train(args) if args.mode == "train" else bench_decode(args)
    record = {
        "bench": "torch_gpt2",
        "mode": args.mode,
        "batch": args.batch,
        "seq": args.seq if args.mode == "train" else args.prompt_len + args.max_new_tokens,
        "compile": args.compile,
        "threads": args.threads,
        "loadavg_1m_start": load_start,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **result,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
