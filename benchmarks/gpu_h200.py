"""One H200: `lm bench` tokens/s and MFU, and peak memory of one SFT step vs `lm plan`.

Measures, each case in a fresh worker process (this script run with `--worker`):

- `lm bench` of `configs/pod_1b.yaml` (1.3B, seq 2,048, batch 16, tiled loss, one GPU) and of
  `configs/gpu/llama_1b_sft.yaml` (Llama-3.2-1B shapes, 128,256 vocab, tiled loss, 64 × 1,024
  tokens as 8 micro-batches), both bf16 over f32 weights with cuDNN attention: tokens/s, and
  MFU against the measured ~790 TFLOP/s bf16 matmul peak of one H200 (`lm bench` itself divides
  by the 989 TFLOP/s datasheet figure of `lm.runtime.flops`; both are printed);
- peak device memory (`memory_stats()["peak_bytes_in_use"]`) of `llama_1b_sft.yaml` train
  steps, full fine-tune (the `lm bench` process above: same optimizer and loss as
  `lm finetune`'s for this config) and LoRA (`finetune.lora_rank=16`: the step `lm finetune`
  builds, frozen base, AdamW on the adapters and head only), against `plan_memory(cfg, 1)`.

On the device machine (one H200, JAX with CUDA), from the repository root, ~5 minutes:

    python benchmarks/gpu_h200.py --out $OUT/gpu_h200.json

CPU check of every code path (tiny shapes, XLA attention, 2 steps, ~1 minute):

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/gpu_h200.py --smoke

Wheels: none need to be carried if the machine has jax[cuda], flax, optax, orbax-checkpoint,
sentencepiece, pyyaml and etils. `lm bench` imports grain, tensorflow-datasets and tensorboardX
at module level (lm.train.loop -> lm.data.pipeline -> lm.data.sources / lm.data.batches, and
lm.train.metrics) without calling them; where they are missing the workers put empty stand-in
modules in their place (`--stubs auto`, said on stderr). With `--stubs never`, carry the
grain, tensorflow-datasets (and its dependencies) and tensorboardX wheels instead.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16 = 790e12  # measured dense bf16 matmul FLOP/s of one H200 (datasheet: 989e12)
MARK = "GPU_H200_RESULT "  # prefix of a worker's result line
OPTIONAL = ("grain", "tensorflow_datasets", "tensorboardX")  # imported by lm, unused by bench

POD = "configs/pod_1b.yaml"
LLAMA = "configs/gpu/llama_1b_sft.yaml"
GPU = ["model.attention=cudnn", "model.dtype=bfloat16", "mesh.data=1", "mesh.fsdp=1"]
GPU += ["mesh.tensor=1"]
SMOKE = [  # every shape tiny; XLA attention (cuDNN's needs a GPU)
    "model.vocab_size=512",
    "model.d_model=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.d_ff=128",
    "model.max_seq_len=64",
    "model.attention=xla",
    "data.seq_len=32",
    "data.batch_size=4",
]
# name, config, overrides (real run), overrides added in smoke mode, worker kind, steps, warmup
CASES: list[tuple[str, str, list[str], list[str], str, int, int]] = [
    # loss_chunk pinned: 512 is the GPU profile's tile (lm/runtime/platforms.py) for `-1`.
    (
        "pod_1b bench",
        POD,
        [*GPU, "data.batch_size=16", "train.loss_chunk=512"],
        ["train.loss_chunk=16"],
        "bench",
        15,
        2,
    ),
    (
        "llama_1b full FT",
        LLAMA,
        GPU,
        ["optim.grad_accum=2", "train.loss_chunk=16"],
        "bench",
        10,
        2,
    ),
    (
        "llama_1b LoRA r16",
        LLAMA,
        [*GPU, "finetune.lora_rank=16"],
        ["optim.grad_accum=2", "train.loss_chunk=16"],
        "lora",
        5,
        2,
    ),
]


# ---------------------------------------------------------------- worker side (imports JAX)


class _Stub:
    """Stands in for any attribute, class or call of a missing optional module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return self

    def __getattr__(self, name: str) -> _Stub:
        return self


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> type[_Stub]:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of `roots` (and their submodules) yield `_StubModule`s."""

    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name.split(".")[0] not in self.roots:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__file__ = f"/nonexistent/{spec.name.replace('.', '/')}/__init__.py"
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install_stubs(mode: str) -> None:
    """Stand-ins for the `OPTIONAL` modules: those missing (`auto`), all (`always`) or none."""
    if mode == "never":
        return
    roots = {n for n in OPTIONAL if mode == "always" or importlib.util.find_spec(n) is None}
    if roots:
        print(f"stand-in modules (not installed or forced): {sorted(roots)}", file=sys.stderr)
        sys.meta_path.insert(0, _StubFinder(roots))


def _memory() -> dict[str, Any]:
    """Peak bytes in use on device 0 (None where the backend keeps no statistics, e.g. CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "device_bytes_limit": stats.get("bytes_limit"),
    }


def _plan(cfg: Any) -> dict[str, Any]:
    from lm.commands.plan import plan_memory

    plan = plan_memory(cfg, 1)
    full_remat = cfg.model.remat != "none"
    return {
        "plan_bytes": plan.total(cfg.model.remat),
        "plan_params_bytes": plan.params,
        "plan_optimizer_bytes": plan.optimizer,
        "plan_gradients_bytes": plan.gradients,
        "plan_activations_bytes": plan.activations_full_remat
        if full_remat
        else plan.activations_no_remat,
        "parameters": plan.parameters,
    }


def _lora_steps(cfg: Any, steps: int, warmup: int) -> dict[str, Any]:
    """`lm finetune`'s train step for `cfg` (frozen base, adapters trained) on synthetic rows."""
    import statistics

    import jax

    from lm.commands.bench import synthetic_batch, time_steps
    from lm.runtime.mesh import batch_sharding
    from lm.tasks import task_for
    from lm.train.freeze import finetune_optimizer, gate_frozen
    from lm.train.loop import run_mesh, start_session

    mesh = run_mesh(cfg)
    batch_np = synthetic_batch(cfg)
    with jax.set_mesh(mesh):
        session = start_session(cfg, mesh, finetune_optimizer(cfg))
        step = session.train_step(gate_frozen(cfg, task_for(cfg).objective(cfg, batch_np)))
        batch = jax.device_put(batch_np, batch_sharding(mesh))
        times, warmup_s, metrics = time_steps(step, session.state, batch, steps, warmup)
    median = statistics.median(times)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return {
        "tokens_per_step": tokens,
        "step_time_median_s": median,
        "tokens_per_s": tokens / median,
        "warmup_s": warmup_s,
        "final_loss": float(metrics["loss"]),
    }


def worker(kind: str, config: str, overrides: list[str], steps: int, warmup: int) -> None:
    """One case in this process: prints `MARK` + JSON of its measurements."""
    from lm.cli import main as lm_main
    from lm.config import load_config

    cfg = load_config(config, overrides)
    result: dict[str, Any] = {}
    if kind == "bench":  # `lm bench` itself; its last printed line is its JSON result
        argv = ["bench", "--config", config, *overrides, "--steps", str(steps)]
        code = lm_main([*argv, "--warmup", str(warmup)])
        if code:
            raise SystemExit(code)
    else:
        result.update(_lora_steps(cfg, steps, warmup))
    result.update(_memory())
    result.update(_plan(cfg))
    print(MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------- driver side (no JAX)


def run_case(
    case: tuple[str, str, list[str], list[str], str, int, int], args: argparse.Namespace
) -> dict[str, Any]:
    name, config, overrides, smoke, kind, steps, warmup = case
    if args.smoke:
        overrides, steps, warmup = [*overrides, *SMOKE, *smoke], 2, 1
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    command += ["--stubs", args.stubs, "--steps", str(steps), "--warmup", str(warmup)]
    command += ["--config", config, *overrides]
    row: dict[str, Any] = {"case": name, "config": config, "overrides": overrides}
    print(f"== {name}: {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=args.case_timeout
        )
        out, err, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        out, err, code = str(expired.stdout or ""), str(expired.stderr or ""), "timeout"
    row["wall_s"] = round(time.perf_counter() - start, 1)
    lines = out.strip().splitlines()
    bench = [json.loads(x) for x in lines if x.startswith("{") and '"tokens_per_s"' in x]
    if bench:
        row.update(bench[-1])
    for line in lines:
        if line.startswith(MARK):
            row.update(json.loads(line[len(MARK) :]))
    if code != 0 or not any(line.startswith(MARK) for line in lines):
        row["error"] = f"exit {code}: " + (err.strip().splitlines() or ["no output"])[-1]
        print(err[-3000:], file=sys.stderr)
    if "model_tflops_per_s" in row:
        row["mfu_vs_790"] = row["model_tflops_per_s"] * 1e12 / PEAK_BF16
    if row.get("peak_bytes") and row.get("plan_bytes"):
        row["peak_over_plan"] = row["peak_bytes"] / row["plan_bytes"]
    return row


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


def _bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2**30:.2f}G" if value >= 2**30 else f"{value / 2**20:.1f}M"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'case':<20}{'tokens/s':>12}{'step ms':>10}{'MFU/790T':>10}{'MFU/lm':>9}"
        f"{'peak':>10}{'plan':>10}{'peak/plan':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<20}{_fmt(r.get('tokens_per_s'), ',.0f'):>12}"
            f"{_fmt(r.get('step_time_median_s'), '.1f', 1e-3):>10}"
            f"{_fmt(r.get('mfu_vs_790'), '.1%'):>10}{_fmt(r.get('mfu'), '.1%'):>9}"
            f"{_bytes(r.get('peak_bytes')):>10}{_bytes(r.get('plan_bytes')):>10}"
            f"{_fmt(r.get('peak_over_plan'), '.2f'):>10}"
            + (f"  ERROR {r['error']}" if "error" in r else "")
        )
    lines.append(
        f"MFU/790T: model FLOPs (lm.runtime.flops) / {PEAK_BF16 / 1e12:.0f} TFLOP/s measured bf16 "
        "peak; MFU/lm: `lm bench`'s own figure (datasheet peak; a measured f32 matmul on CPU).\n"
        "peak: device 0's peak_bytes_in_use (n/a: no statistics, e.g. CPU); plan: lm plan's "
        "total for 1 device (G = GiB, M = MiB)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, 2 steps")
    default_out = Path(os.environ["OUT"]) / "gpu_h200.json" if "OUT" in os.environ else None
    parser.add_argument("--out", type=Path, default=default_out or Path("gpu_h200.json"))
    parser.add_argument("--stubs", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--case-timeout", type=float, default=240.0, help="seconds per case")
    parser.add_argument("--worker", choices=("bench", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        install_stubs(args.stubs)
        worker(args.worker, args.config, args.overrides, args.steps, args.warmup)
        return
    start = time.perf_counter()
    rows = [run_case(case, args) for case in CASES]
    print(table(rows))
    summary = {
        "smoke": args.smoke,
        "peak_bf16_flops": PEAK_BF16,
        "wall_s": round(time.perf_counter() - start, 1),
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")
    print(json.dumps(summary))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
