"""`lm plan`: estimate memory per device for a config on a mesh, before renting the hardware.

Parameters, AdamW moments and gradients are exact: their shapes come from the model the
config builds (`jax.eval_shape`, nothing allocated) and each is split the way `lm.runtime.mesh`'s
rules shard it on the given mesh, so replicated dimensions count in full. Activations are an
estimate of what the backward pass keeps, per micro-batch on one device:

- without remat, per layer and token: the block input, both norm outputs and the residual
  between them (4·D), q/k/v and the attention output ((2·D + 2·G·hd) / t), the attention
  probabilities (H·L / t; H / t for cuDNN's flash attention, which keeps only the
  log-sum-exp), and the MLP's hidden activations (3·F / t for SwiGLU, 2·F / t for GELU);
- with full remat, per layer and token only the block input (D), plus one block's activations
  alive while it is recomputed;
- with remat of all but the matmuls (`dots`, `dots_no_batch`), per layer and token the block
  input and every matmul's output (q, k, v, both output projections, the MLP's input
  projections; under `dots` the attention scores too unless a fused kernel computes them);
- all: the f32 logits and their gradient (2·V / t per token; with a tiled loss, that times
  the chunk's share of the sequence), for models that output vocabulary logits.

Here t is the tensor-parallel size, B·L the micro-batch tokens on one device (batch over
data·fsdp, split by gradient accumulation). Against XLA's `memory_analysis()` of the compiled
step on CPU the full-remat figure matched within 2% (shakespeare.yaml, bench_cpu.yaml) while
the no-remat figure was 35-40% low: XLA keeps more attention and MLP intermediates than
counted here, so treat it as a lower bound and leave headroom.

`--topology` (a TPU slice, with libtpu) and `--gpu` (NVIDIA GPUs of one host, with JAX's CUDA
plugin) instead compile the real train step on this host (`plan_compiled`, `lm.runtime.aot`):
the step `lm pretrain` or `lm finetune` runs for the config (a task's objective and trainable
parameters included), XLA's own bytes per device, the kernels and collectives it chose, and a
roofline estimate of step time and MFU from XLA's cost analysis and the datasheet. With
`--decode` (`plan_decode`) they compile the decode step `lm generate` runs instead, with a
roofline estimate of tokens/s (each step reads every weight and the whole cache: memory
bandwidth bounds it).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import Config, ConfigError, mesh_shape
from lm.model.build import build_model
from lm.model.transformer import abstract_split
from lm.runtime.aot import (
    Chip,
    CompiledDecode,
    CompiledStep,
    Target,
    collective_bytes,
    collectives,
    compile_decode_step,
    compile_train_step,
    slice_target,
)
from lm.runtime.flops import decode_flops_per_token, train_flops_per_token
from lm.runtime.gpus import gpu_target
from lm.runtime.mesh import MESH_AXES, logical_to_spec
from lm.runtime.platforms import for_platform
from lm.tasks import task_for
from lm.train.freeze import trainable_groups, trainable_mask


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device for one config on one mesh."""

    devices: int
    mesh: dict[str, int]
    parameters: int  # parameter count of the whole model
    tokens_per_device: int  # micro-batch tokens one device processes at a time
    params: int
    optimizer: int
    gradients: int
    activations_no_remat: int
    activations_full_remat: int
    activations_dots: int  # remat keeping every matmul's output (`dots`, `dots_no_batch`)

    @property
    def total_no_remat(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations_no_remat

    @property
    def total_full_remat(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations_full_remat

    def total(self, remat: str) -> int:
        """The total for `model.remat=remat`."""
        activations = {"none": self.activations_no_remat, "full": self.activations_full_remat}
        return (
            self.params
            + self.optimizer
            + self.gradients
            + activations.get(remat, self.activations_dots)
        )


def _shard_elements(shape: tuple[int, ...], logical, mesh: dict[str, int]) -> int:
    """Elements of one device's shard of an array of `shape` laid out by the sharding rules."""
    spec = logical_to_spec(logical, shape, mesh)
    count = 1
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else (axes,) if isinstance(axes, str) else axes
        count *= math.ceil(size / math.prod(mesh[a] for a in names))
    return count


def _variables(tree) -> list[nnx.Variable]:
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _activation_bytes(cfg: Config, mesh: dict[str, int], remat: str) -> tuple[int, int]:
    """(tokens per device per micro-batch, bytes of activations kept for the backward pass
    under `model.remat=remat`)."""
    m = cfg.model
    rows = cfg.data.batch_size // cfg.optim.grad_accum / (mesh["data"] * mesh["fsdp"])
    tokens = max(1, math.ceil(rows)) * cfg.data.seq_len
    t = mesh["tensor"]
    d, f, h, g, hd, seq = m.d_model, m.d_ff, m.num_heads, m.kv_heads, m.head_dim, cfg.data.seq_len
    # Fused kernels keep one softmax statistic per query and head, not the [L, L] probabilities.
    probs = h if m.attention in ("cudnn", "splash") else h * seq
    hidden = 3 * f if m.mlp == "swiglu" else 2 * f
    block = 4 * d + (2 * d + 2 * g * hd + probs + hidden) / t
    # The outputs of every matmul: q, k, v, the attention and MLP output projections, the MLP's
    # input projections, and under `dots` the batched attention scores unless a fused kernel
    # computes them; the block input besides.
    projected = 2 * f if m.mlp == "swiglu" else f
    matmuls = d + 2 * d + (m.num_heads * hd + 2 * g * hd + projected) / t
    if remat == "dots" and m.attention not in ("cudnn", "splash"):
        matmuls += h * seq / t
    width = jnp.dtype(m.dtype).itemsize
    kept = {"none": m.num_layers * block, "full": m.num_layers * d + block}.get(
        remat, m.num_layers * matmuls + block
    )
    # f32 logits and their gradient, for models that output vocabulary logits (a task head
    # instead outputs a few numbers per row); a tiled loss holds one chunk's at a time.
    chunk = cfg.train.loss_chunk or seq
    vocab = not cfg.finetune.task or task_for(cfg).predicts_tokens
    logits = 2 * m.vocab_size / t * 4 * chunk / seq if vocab else 0
    return tokens, int(tokens * (kept * width + logits))


def plan_memory(cfg: Config, devices: int, platform: str | None = None) -> MemoryPlan:
    """Memory per device of training `cfg` on `devices` devices (mesh from `cfg.mesh`) of
    `platform` (default: this machine's), whose profile chooses the `auto` values."""
    cfg = for_platform(cfg, platform)
    sizes = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, devices), strict=True))
    micro = cfg.data.batch_size // cfg.optim.grad_accum
    if micro % (sizes["data"] * sizes["fsdp"]):
        raise ConfigError(
            f"data.batch_size / optim.grad_accum = {micro} rows cannot split over "
            f"data*fsdp = {sizes['data'] * sizes['fsdp']} devices; pick another mesh or batch."
        )
    with nnx.use_eager_sharding(False):
        _, abstract = abstract_split(lambda: build_model(cfg, nnx.Rngs(0)))
    state = nnx.filter_state(abstract, nnx.Param)
    params = _variables(state)
    trainable = trainable_groups(cfg) if cfg.finetune.task else None
    trains = [True] * len(params)
    if trainable:  # the mask reads each parameter's group and path in the state
        trains = [t.get_value() for t in _variables(trainable_mask(state, trainable))]
    count, param_bytes, trained_bytes = 0, 0, 0
    for v, trained in zip(params, trains, strict=True):
        count += math.prod(v.shape)
        size = _shard_elements(v.shape, v.get_metadata().get("out_sharding"), sizes)
        param_bytes += size * v.dtype.itemsize
        trained_bytes += size * v.dtype.itemsize if trained else 0
    accumulator = trained_bytes if cfg.optim.grad_accum > 1 else 0
    tokens, no_remat = _activation_bytes(cfg, sizes, "none")
    _, full_remat = _activation_bytes(cfg, sizes, "full")
    dots_policy = "dots" if cfg.model.remat == "dots" else "dots_no_batch"
    _, dots = _activation_bytes(cfg, sizes, dots_policy)
    return MemoryPlan(
        devices=devices,
        mesh=sizes,
        parameters=count,
        tokens_per_device=tokens,
        params=param_bytes,
        # AdamW's two moments and the gradients, for the parameters that train
        optimizer=2 * trained_bytes,
        gradients=trained_bytes + accumulator,
        activations_no_remat=no_remat,
        activations_full_remat=full_remat,
        activations_dots=dots,
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(name: str, plan: MemoryPlan) -> str:
    """A short human-readable table of `plan`."""
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    rows = [
        ("parameters", plan.params),
        ("optimizer (AdamW)", plan.optimizer),
        ("gradients", plan.gradients),
        ("activations, no remat", plan.activations_no_remat),
        ("activations, full remat", plan.activations_full_remat),
        ("activations, remat dots", plan.activations_dots),
        ("total, no remat", plan.total_no_remat),
        ("total, full remat", plan.total_full_remat),
        ("total, remat dots", plan.total("dots")),
    ]
    head = (
        f"{name}: {plan.parameters / 1e6:,.2f}M parameters on {plan.devices} devices "
        f"({mesh}); {plan.tokens_per_device:,} tokens per device per micro-batch"
    )
    return "\n".join([head] + [f"  {label:<26}{_gib(value):>14}" for label, value in rows])


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    """The train step compiled for a TPU slice or GPUs, with a roofline estimate of its speed."""

    target: Target
    step: CompiledStep
    collective_bytes: int  # sent per device per step
    model_flops: float  # the model's FLOPs per device per step (`lm.runtime.flops`)
    analytic_bytes: int  # `plan_memory`'s total for the same config and devices

    @property
    def fits(self) -> bool:
        return self.step.peak <= self.target.chip.memory_bytes

    @property
    def fsdp_ideal_bytes(self) -> int:
        # FSDP gathers every weight forward and backward and reduce-scatters every gradient.
        return 3 * self.step.param_bytes_compute

    @property
    def flops(self) -> float:
        """XLA's count of the compiled step's FLOPs (recomputation included), never below the
        model's formula: a deviceless GPU gives no count, and a count that misses loop trips
        would be below what the step must do. The formula counts no recomputation, so it is
        optimistic under remat."""
        return max(self.step.flops, self.model_flops)

    @property
    def compute_s(self) -> float:
        return self.flops / self.target.chip.peak_bf16_flops

    @property
    def memory_s(self) -> float:
        return self.step.bytes_accessed / self.target.chip.memory_bytes_per_s

    @property
    def collective_s(self) -> float:
        return self.collective_bytes / self.target.chip.link_bytes_per_s

    @property
    def step_s(self) -> float:
        """Roofline: compute, memory traffic and collectives fully overlapped."""
        return max(self.compute_s, self.memory_s, self.collective_s)

    @property
    def mfu(self) -> float:
        return self.model_flops / self.target.chip.peak_bf16_flops / self.step_s


def plan_compiled(cfg: Config, target: Target) -> CompiledPlan:
    """Compile `cfg`'s train step for `target`'s devices (no such device needed)."""
    devices = len(target.devices)
    step = compile_train_step(cfg, target.devices)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    platform = target.devices[0].platform
    return CompiledPlan(
        target=target,
        step=step,
        collective_bytes=collective_bytes(collectives(step.hlo)),
        model_flops=train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens / devices,
        analytic_bytes=plan_memory(cfg, devices, platform).total(cfg.model.remat),
    )


def plan_target(name: str | None, gpu: str | None) -> Target:
    """The devices `--topology NAME` or `--gpu NAME[:N]` describes."""
    return gpu_target(gpu) if gpu else slice_target(name)


def _count(devices: int) -> str:
    return f"{devices} device{'s' if devices != 1 else ''}"


def _memory_lines(step, chip: Chip, fits: bool) -> list[str]:
    return [
        f"  {'peak (args+outputs+temps)':<26}{_gib(step.peak):>14}  of "
        f"{_gib(chip.memory_bytes)} {chip.memory} per {chip.generation}",
        f"  {'fits' if fits else 'does NOT fit'}: {step.peak / chip.memory_bytes:.1%} of "
        f"{chip.memory} ({1 - step.peak / chip.memory_bytes:.1%} headroom)",
    ]


def format_compiled_plan(config_name: str, plan: CompiledPlan) -> str:
    """A human-readable report of `plan`, ending with one JSON line."""
    step, target, chip = plan.step, plan.target, plan.target.chip
    devices = len(target.devices)
    mesh = " ".join(f"{k}={v}" for k, v in step.mesh.items())
    found = collectives(step.hlo)
    by_kind = ", ".join(
        f"{sum(c.count for c in ops)} {kind} ({_gib(collective_bytes(ops))})"
        for kind in sorted({c.kind for c in found})
        for ops in [[c for c in found if c.kind == kind]]
    )
    calls = step.custom_calls
    lines = [
        f"{config_name} on {target.name} ({target.description}, {_count(devices)}, {mesh}); "
        f"compiled by XLA for {target.compiler} in {step.compile_s:.1f} s",
        f"  {'parameters':<26}{_gib(step.params):>14}",
        f"  {'optimizer state':<26}{_gib(step.optimizer):>14}",
        f"  {'temporaries':<26}{_gib(step.temporaries):>14}",
        *_memory_lines(step, chip, plan.fits),
        f"  analytic plan (lm plan without --topology/--gpu): "
        f"{_gib(plan.analytic_bytes).strip()}, {plan.analytic_bytes / step.peak - 1:+.0%} "
        "against XLA's peak",
        "  attention and library kernels (custom calls): "
        + (", ".join(f"{k} x{n}" for k, n in calls.items()) or "none"),
        f"  collectives per step (loops counted): {by_kind or 'none'}",
    ]
    if devices > 1:
        lines.append(
            f"  collective bytes sent per device per step (ring; an all-reduce counts twice): "
            f"{plan.collective_bytes:,d}; FSDP ideal 3 x {step.param_bytes_compute:,d} = "
            f"{plan.fsdp_ideal_bytes:,d} ({plan.collective_bytes / plan.fsdp_ideal_bytes:.2f}x)"
        )
    source = "XLA's cost analysis" if step.flops > plan.model_flops else "the model's FLOP formula"
    traffic = (
        f"{step.bytes_accessed:.3g} bytes / {chip.memory_bytes_per_s / 1e9:,.0f} GB/s "
        f"{chip.memory} = {plan.memory_s * 1e3:.3g} ms, "
        if step.bytes_accessed
        else f"{chip.memory} traffic not counted (no cost analysis from XLA), "
    )
    lines.append(
        f"  estimate (roofline from {source} and the datasheet, not a measurement): "
        f"{plan.flops:.3g} FLOPs / {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 = "
        f"{plan.compute_s * 1e3:.3g} ms, {traffic}collectives / "
        f"{chip.link_bytes_per_s / 1e9:.0f} GB/s {chip.link} = {plan.collective_s * 1e3:.3g} ms; "
        f"overlapped: {plan.step_s * 1e3:.3g} ms per step, MFU {plan.mfu:.0%}"
    )
    summary = {
        "target": target.name,
        "topology": target.description,
        "chips": devices,
        "mesh": step.mesh,
        "fits": plan.fits,
        "hbm_per_chip_bytes": chip.memory_bytes,
        "compiled_peak_bytes_per_chip": step.peak,
        "params_bytes_per_chip": step.params,
        "optimizer_bytes_per_chip": step.optimizer,
        "temp_bytes_per_chip": step.temporaries,
        "analytic_peak_bytes_per_chip": plan.analytic_bytes,
        "custom_calls": calls,
        "collective_bytes_per_step": plan.collective_bytes,
        "fsdp_ideal_collective_bytes_per_step": plan.fsdp_ideal_bytes,
        "compiled_flops_per_chip": step.flops,
        "compiled_bytes_accessed_per_chip": step.bytes_accessed,
        "model_flops_per_chip": plan.model_flops,
        "compile_s": round(step.compile_s, 2),
        "estimated_step_s": plan.step_s,
        "estimated_mfu": round(plan.mfu, 4),
    }
    return "\n".join(lines + [json.dumps(summary)])


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The decode step compiled for a TPU slice or GPUs, with a roofline estimate of its speed."""

    target: Target
    step: CompiledDecode
    collective_bytes: int  # sent per device per decoded token
    flops_per_chip: float  # model FLOPs per device per step (all rows, a full cache)

    @property
    def fits(self) -> bool:
        return self.step.peak <= self.target.chip.memory_bytes

    @property
    def read_s(self) -> float:
        """Reading every weight and the whole cache once, from device memory."""
        return (self.step.params + self.step.cache) / self.target.chip.memory_bytes_per_s

    @property
    def step_s(self) -> float:
        """Roofline: the slowest of compute, memory reads and collectives, fully overlapped."""
        chip = self.target.chip
        compute_s = self.flops_per_chip / chip.peak_bf16_flops
        return max(compute_s, self.read_s, self.collective_bytes / chip.link_bytes_per_s)

    @property
    def tokens_per_s(self) -> float:
        return self.step.rows / self.step_s


def plan_decode(cfg: Config, target: Target) -> DecodePlan:
    """Compile `cfg`'s decode step for `target`'s devices (no such device needed)."""
    step = compile_decode_step(cfg, target.devices)
    flops = decode_flops_per_token(cfg.model, step.slots) * step.rows
    return DecodePlan(
        target=target,
        step=step,
        collective_bytes=collective_bytes(collectives(step.hlo)),
        flops_per_chip=flops / len(target.devices),
    )


def format_decode_plan(config_name: str, plan: DecodePlan) -> str:
    """A human-readable report of `plan`, ending with one JSON line."""
    step, target, chip = plan.step, plan.target, plan.target.chip
    mesh = " ".join(f"{k}={v}" for k, v in step.mesh.items())
    lines = [
        f"{config_name} decoding on {target.name} ({target.description}, "
        f"{_count(len(target.devices))}, {mesh}): {step.rows} rows, a {step.slots}-slot KV "
        f"cache, parameters as trained; compiled by XLA for {target.compiler} in "
        f"{step.compile_s:.1f} s",
        f"  {'parameters':<26}{_gib(step.params):>14}",
        f"  {'KV cache':<26}{_gib(step.cache):>14}",
        f"  {'temporaries':<26}{_gib(step.temporaries):>14}",
        *_memory_lines(step, chip, plan.fits),
        f"  collective bytes sent per device per step: {plan.collective_bytes:,d}",
        f"  estimate (roofline, not a measurement): reading weights and cache at "
        f"{chip.memory_bytes_per_s / 1e9:,.0f} GB/s {chip.memory} = {plan.read_s * 1e3:.3g} ms; "
        f"with compute and collectives {plan.step_s * 1e3:.3g} ms per step, "
        f"{plan.tokens_per_s:,.0f} tokens/s in all",
    ]
    summary = {
        "target": target.name,
        "topology": target.description,
        "chips": len(target.devices),
        "mesh": step.mesh,
        "fits": plan.fits,
        "rows": step.rows,
        "cache_slots": step.slots,
        "hbm_per_chip_bytes": chip.memory_bytes,
        "compiled_peak_bytes_per_chip": step.peak,
        "params_bytes_per_chip": step.params,
        "kv_cache_bytes_per_chip": step.cache,
        "collective_bytes_per_step": plan.collective_bytes,
        "compile_s": round(step.compile_s, 2),
        "estimated_step_s": plan.step_s,
        "estimated_tokens_per_s": round(plan.tokens_per_s, 1),
    }
    return "\n".join(lines + [json.dumps(summary)])
