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
- both: the f32 logits and their gradient (2·V / t per token; with a tiled loss, that times
  the chunk's share of the sequence).

Here t is the tensor-parallel size, B·L the micro-batch tokens on one device (batch over
data·fsdp, split by gradient accumulation). Against XLA's `memory_analysis()` of the compiled
step on CPU the full-remat figure matched within 2% (shakespeare.yaml, bench_cpu.yaml) while
the no-remat figure was 35-40% low: XLA keeps more attention and MLP intermediates than
counted here, so treat it as a lower bound and leave headroom.

`--topology` (`plan_slice`) instead compiles the real train step for a TPU slice with libtpu's
compiler on this host (`lm.runtime.aot`): XLA's own bytes per chip, the collectives it emits,
and a roofline estimate of step time and MFU from the chip's datasheet figures. With `--decode`
(`plan_decode`) it compiles the decode step `lm generate` runs instead, with a roofline
estimate of tokens/s (each step reads every weight and the whole cache: HBM bandwidth bounds it).
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
    collective_bytes,
    collectives,
    compile_decode_step,
    compile_train_step,
    slice_devices,
    topology_name,
)
from lm.runtime.flops import decode_flops_per_token, train_flops_per_token
from lm.runtime.mesh import MESH_AXES, logical_to_spec
from lm.runtime.platforms import for_platform
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

    @property
    def total_no_remat(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations_no_remat

    @property
    def total_full_remat(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations_full_remat

    def total(self, remat: str) -> int:
        """The total for `model.remat=remat`: any recomputation counts as full remat."""
        return self.total_no_remat if remat == "none" else self.total_full_remat


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


def _activation_bytes(cfg: Config, mesh: dict[str, int], remat: bool) -> tuple[int, int]:
    """(tokens per device per micro-batch, bytes of activations kept for the backward pass)."""
    m = cfg.model
    rows = cfg.data.batch_size // cfg.optim.grad_accum / (mesh["data"] * mesh["fsdp"])
    tokens = max(1, math.ceil(rows)) * cfg.data.seq_len
    t = mesh["tensor"]
    d, f, h, g, hd, seq = m.d_model, m.d_ff, m.num_heads, m.kv_heads, m.head_dim, cfg.data.seq_len
    # Fused kernels keep one softmax statistic per query and head, not the [L, L] probabilities.
    probs = h if m.attention in ("cudnn", "splash") else h * seq
    hidden = 3 * f if m.mlp == "swiglu" else 2 * f
    block = 4 * d + (2 * d + 2 * g * hd + probs + hidden) / t
    width = jnp.dtype(m.dtype).itemsize
    kept = (m.num_layers * d + block) if remat else m.num_layers * block
    # f32 logits and their gradient; a tiled loss holds one chunk's at a time.
    chunk = cfg.train.loss_chunk or seq
    logits = 2 * m.vocab_size / t * 4 * chunk / seq
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
    state = abstract.filter(nnx.Param)
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
    tokens, no_remat = _activation_bytes(cfg, sizes, remat=False)
    _, full_remat = _activation_bytes(cfg, sizes, remat=True)
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
        ("total, no remat", plan.total_no_remat),
        ("total, full remat", plan.total_full_remat),
    ]
    head = (
        f"{name}: {plan.parameters / 1e6:,.2f}M parameters on {plan.devices} devices "
        f"({mesh}); {plan.tokens_per_device:,} tokens per device per micro-batch"
    )
    return "\n".join([head] + [f"  {label:<26}{_gib(value):>14}" for label, value in rows])


@dataclasses.dataclass(frozen=True)
class SlicePlan:
    """The train step compiled for a TPU slice, with a roofline estimate of its speed."""

    name: str
    chips: int
    chip: Chip
    step: CompiledStep
    collective_bytes: int  # sent per chip per step
    flops_per_chip: float  # model FLOPs per chip per step
    analytic_bytes: int  # `plan_memory`'s total for the same config and chips

    @property
    def fits(self) -> bool:
        return self.step.peak <= self.chip.hbm_bytes

    @property
    def fsdp_ideal_bytes(self) -> int:
        # FSDP gathers every weight forward and backward and reduce-scatters every gradient.
        return 3 * self.step.param_bytes_compute

    @property
    def compute_s(self) -> float:
        return self.flops_per_chip / self.chip.peak_bf16_flops

    @property
    def collective_s(self) -> float:
        return self.collective_bytes / self.chip.ici_bytes_per_s

    @property
    def step_s(self) -> float:
        """Roofline: compute and collectives fully overlapped; HBM bandwidth ignored."""
        return max(self.compute_s, self.collective_s)

    @property
    def mfu(self) -> float:
        return self.compute_s / self.step_s


def plan_slice(cfg: Config, name: str) -> SlicePlan:
    """Compile `cfg`'s train step for TPU slice `name` (libtpu needed, no TPU)."""
    devices, chip = slice_devices(name)
    step = compile_train_step(cfg, devices)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return SlicePlan(
        name=name,
        chips=len(devices),
        chip=chip,
        step=step,
        collective_bytes=collective_bytes(collectives(step.hlo)),
        flops_per_chip=train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens / len(devices),
        analytic_bytes=plan_memory(cfg, len(devices), "tpu").total(cfg.model.remat),
    )


def format_slice_plan(config_name: str, plan: SlicePlan) -> str:
    """A human-readable report of `plan`, ending with one JSON line."""
    step, chip = plan.step, plan.chip
    mesh = " ".join(f"{k}={v}" for k, v in step.mesh.items())
    found = collectives(step.hlo)
    by_kind = ", ".join(
        f"{sum(c.count for c in ops)} {kind} ({_gib(collective_bytes(ops))})"
        for kind in sorted({c.kind for c in found})
        for ops in [[c for c in found if c.kind == kind]]
    )
    lines = [
        f"{config_name} on {plan.name} ({topology_name(plan.name)[0]}, {plan.chips} chips, "
        f"{mesh}); compiled by XLA for TPU in {step.compile_s:.1f} s",
        f"  {'parameters':<26}{_gib(step.params):>14}",
        f"  {'optimizer state':<26}{_gib(step.optimizer):>14}",
        f"  {'temporaries':<26}{_gib(step.temporaries):>14}",
        f"  {'peak (args+outputs+temps)':<26}{_gib(step.peak):>14}  of "
        f"{_gib(chip.hbm_bytes)} HBM per {chip.generation} chip",
        f"  {'fits' if plan.fits else 'does NOT fit'}: {step.peak / chip.hbm_bytes:.1%} of HBM",
        f"  analytic plan (lm plan without --topology): {_gib(plan.analytic_bytes).strip()}, "
        f"{plan.analytic_bytes / step.peak - 1:+.0%} against XLA's peak",
        f"  collectives per step (loops counted): {by_kind or 'none'}",
        f"  collective bytes sent per chip per step (ring; an all-reduce counts twice): "
        f"{plan.collective_bytes:,d}; FSDP ideal 3 x {step.param_bytes_compute:,d} = "
        f"{plan.fsdp_ideal_bytes:,d} ({plan.collective_bytes / plan.fsdp_ideal_bytes:.2f}x)",
        f"  estimate (roofline, not a measurement): {plan.flops_per_chip:.3g} FLOPs per chip "
        f"/ {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 = {plan.compute_s * 1e3:.3g} ms, "
        f"collectives / {chip.ici_bytes_per_s / 1e9:.0f} GB/s ICI = "
        f"{plan.collective_s * 1e3:.3g} ms; overlapped: {plan.step_s * 1e3:.3g} ms per step, "
        f"MFU {plan.mfu:.0%}",
    ]
    summary = {
        "topology": topology_name(plan.name)[0],
        "chips": plan.chips,
        "mesh": step.mesh,
        "fits": plan.fits,
        "hbm_per_chip_bytes": chip.hbm_bytes,
        "compiled_peak_bytes_per_chip": step.peak,
        "params_bytes_per_chip": step.params,
        "optimizer_bytes_per_chip": step.optimizer,
        "temp_bytes_per_chip": step.temporaries,
        "analytic_peak_bytes_per_chip": plan.analytic_bytes,
        "collective_bytes_per_step": plan.collective_bytes,
        "fsdp_ideal_collective_bytes_per_step": plan.fsdp_ideal_bytes,
        "compile_s": round(step.compile_s, 2),
        "estimated_step_s": plan.step_s,
        "estimated_mfu": round(plan.mfu, 4),
    }
    return "\n".join(lines + [json.dumps(summary)])


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The decode step compiled for a TPU slice, with a roofline estimate of its speed."""

    chip: Chip
    chips: int
    step: CompiledDecode
    collective_bytes: int  # sent per chip per decoded token
    flops_per_chip: float  # model FLOPs per chip per step (all rows, a full cache)

    @property
    def fits(self) -> bool:
        return self.step.peak <= self.chip.hbm_bytes

    @property
    def read_s(self) -> float:
        """Reading every weight and the whole cache once, from HBM."""
        return (self.step.params + self.step.cache) / self.chip.hbm_bytes_per_s

    @property
    def step_s(self) -> float:
        """Roofline: the slowest of compute, HBM reads and collectives, fully overlapped."""
        compute_s = self.flops_per_chip / self.chip.peak_bf16_flops
        return max(compute_s, self.read_s, self.collective_bytes / self.chip.ici_bytes_per_s)

    @property
    def tokens_per_s(self) -> float:
        return self.step.rows / self.step_s


def plan_decode(cfg: Config, name: str) -> DecodePlan:
    """Compile `cfg`'s decode step for TPU slice `name` (libtpu needed, no TPU)."""
    devices, chip = slice_devices(name)
    step = compile_decode_step(cfg, devices)
    flops = decode_flops_per_token(cfg.model, step.slots) * step.rows
    return DecodePlan(
        chip=chip,
        chips=len(devices),
        step=step,
        collective_bytes=collective_bytes(collectives(step.hlo)),
        flops_per_chip=flops / len(devices),
    )


def format_decode_plan(config_name: str, name: str, plan: DecodePlan) -> str:
    """A human-readable report of `plan` for slice `name`, ending with one JSON line."""
    step, chip = plan.step, plan.chip
    mesh = " ".join(f"{k}={v}" for k, v in step.mesh.items())
    lines = [
        f"{config_name} decoding on {name} ({topology_name(name)[0]}, {plan.chips} chips, "
        f"{mesh}): {step.rows} rows, a {step.slots}-slot KV cache, parameters as trained; "
        f"compiled by XLA for TPU in {step.compile_s:.1f} s",
        f"  {'parameters':<26}{_gib(step.params):>14}",
        f"  {'KV cache':<26}{_gib(step.cache):>14}",
        f"  {'temporaries':<26}{_gib(step.temporaries):>14}",
        f"  {'peak (args+outputs+temps)':<26}{_gib(step.peak):>14}  of "
        f"{_gib(chip.hbm_bytes)} HBM per {chip.generation} chip",
        f"  {'fits' if plan.fits else 'does NOT fit'}: {step.peak / chip.hbm_bytes:.1%} of HBM",
        f"  collective bytes sent per chip per step: {plan.collective_bytes:,d}",
        f"  estimate (roofline, not a measurement): reading weights and cache at "
        f"{chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM = {plan.read_s * 1e3:.3g} ms; with compute "
        f"and collectives {plan.step_s * 1e3:.3g} ms per step, {plan.tokens_per_s:,.0f} "
        "tokens/s for the slice",
    ]
    summary = {
        "topology": topology_name(name)[0],
        "chips": plan.chips,
        "mesh": step.mesh,
        "fits": plan.fits,
        "rows": step.rows,
        "cache_slots": step.slots,
        "hbm_per_chip_bytes": chip.hbm_bytes,
        "compiled_peak_bytes_per_chip": step.peak,
        "params_bytes_per_chip": step.params,
        "kv_cache_bytes_per_chip": step.cache,
        "collective_bytes_per_step": plan.collective_bytes,
        "compile_s": round(step.compile_s, 2),
        "estimated_step_s": plan.step_s,
        "estimated_tokens_per_s": round(plan.tokens_per_s, 1),
    }
    return "\n".join(lines + [json.dumps(summary)])
