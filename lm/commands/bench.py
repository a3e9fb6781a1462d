"""`lm bench`: train-step throughput (tokens/s) and MFU on synthetic batches.

Synthetic full-length rows (one document each) isolate the step from the input pipeline.
The last line printed is JSON, for scripts comparing runs side by side.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np

from lm.config import Config
from lm.runtime.flops import peak_flops, train_flops_per_token
from lm.runtime.mesh import batch_sharding
from lm.runtime.platforms import for_platform
from lm.train.loop import run_mesh, start_session
from lm.train.objectives import TokenCrossEntropy
from lm.train.optim import make_optimizer


def synthetic_batch(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens shaped like a training batch (every row one document)."""
    b, length = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (b, length + 1))
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": np.ones((b, length), np.float32),
        "segment_ids": np.ones((b, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
    }


def time_steps(step, state, batch, steps: int, warmup: int) -> tuple[list[float], float, dict]:
    """(seconds of each of `steps` steps after `warmup`, seconds of the warm-up, which
    includes compiling, and the last step's metrics)."""
    start = time.perf_counter()
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times, warmup_s, metrics


def bench(cfg: Config, steps: int = 10, warmup: int = 2) -> dict:
    """Time `steps` train steps after `warmup`; prints and returns tokens/s and MFU.

    A CPU's peak is measured before and after the steps and the higher reading kept: a
    neighbour's burst during one reading would otherwise lower the peak and inflate the MFU.
    """
    mesh = run_mesh(cfg)
    peak_before = peak_flops(jax.devices())
    tx = make_optimizer(cfg.optim, max(cfg.train.steps, steps + warmup))
    with jax.set_mesh(mesh):
        session = start_session(cfg, mesh, tx)
        objective = TokenCrossEntropy(cfg.train.z_loss, for_platform(cfg).train.loss_chunk)
        step, state = session.train_step(objective), session.state
        batch = jax.device_put(synthetic_batch(cfg), batch_sharding(mesh))
        times, compile_s, metrics = time_steps(step, state, batch, steps, warmup)
    peak = max(peak_before, peak_flops(jax.devices()))
    tokens = cfg.data.batch_size * cfg.data.seq_len
    median = statistics.median(times)
    flops = train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    result = {
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(mesh.shape),
        "tokens_per_step": tokens,
        "step_time_median_s": median,
        "tokens_per_s": tokens / median,
        "model_tflops_per_s": flops / median / 1e12,
        "peak_tflops_per_s": peak / 1e12,
        "mfu": flops / median / peak,
        "warmup_s": compile_s,
        "final_loss": float(metrics["loss"]),
    }
    print(
        f"{result['tokens_per_s']:,.0f} tokens/s, step {median * 1e3:.1f} ms, "
        f"MFU {result['mfu']:.1%} of {result['peak_tflops_per_s']:.3f} TFLOP/s peak "
        f"({result['devices']} × {result['device_kind']})"
    )
    print(json.dumps(result))
    return result
