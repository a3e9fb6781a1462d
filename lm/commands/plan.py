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
- both: the f32 logits and their gradient (2·V / t per token).

Here t is the tensor-parallel size, B·L the micro-batch tokens on one device (batch over
data·fsdp, split by gradient accumulation). Against XLA's `memory_analysis()` of the compiled
step on CPU the full-remat figure matched within 2% (shakespeare.yaml, bench_cpu.yaml) while
the no-remat figure was 35-40% low: XLA keeps more attention and MLP intermediates than
counted here, so treat it as a lower bound and leave headroom.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import Config, ConfigError, mesh_shape
from lm.model.build import build_model
from lm.model.transformer import abstract_split
from lm.runtime.mesh import MESH_AXES, logical_to_spec


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


def _shard_elements(shape: tuple[int, ...], logical, mesh: dict[str, int]) -> int:
    """Elements of one device's shard of an array of `shape` laid out by the sharding rules."""
    spec = logical_to_spec(logical, shape, mesh)
    count = 1
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else (axes,) if isinstance(axes, str) else axes
        count *= math.ceil(size / math.prod(mesh[a] for a in names))
    return count


def _activation_bytes(cfg: Config, mesh: dict[str, int], remat: bool) -> tuple[int, int]:
    """(tokens per device per micro-batch, bytes of activations kept for the backward pass)."""
    m = cfg.model
    rows = cfg.data.batch_size // cfg.optim.grad_accum / (mesh["data"] * mesh["fsdp"])
    tokens = max(1, math.ceil(rows)) * cfg.data.seq_len
    t = mesh["tensor"]
    d, f, h, g, hd, seq = m.d_model, m.d_ff, m.num_heads, m.kv_heads, m.head_dim, cfg.data.seq_len
    # Fused kernels keep one softmax statistic per query and head, not the [L, L] probabilities.
    probs = h if m.attention in ("cudnn", "splash", "auto") else h * seq
    hidden = 3 * f if m.mlp == "swiglu" else 2 * f
    block = 4 * d + (2 * d + 2 * g * hd + probs + hidden) / t
    width = jnp.dtype(m.dtype).itemsize
    kept = (m.num_layers * d + block) if remat else m.num_layers * block
    logits = 2 * m.vocab_size / t * 4  # f32 logits and their gradient
    return tokens, int(tokens * (kept * width + logits))


def plan_memory(cfg: Config, devices: int) -> MemoryPlan:
    """Memory per device of training `cfg` on `devices` devices (mesh from `cfg.mesh`)."""

    sizes = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, devices), strict=True))
    micro = cfg.data.batch_size // cfg.optim.grad_accum
    if micro % (sizes["data"] * sizes["fsdp"]):
        raise ConfigError(
            f"data.batch_size / optim.grad_accum = {micro} rows cannot split over "
            f"data*fsdp = {sizes['data'] * sizes['fsdp']} devices; pick another mesh or batch."
        )
    with nnx.use_eager_sharding(False):
        _, abstract = abstract_split(lambda: build_model(cfg, nnx.Rngs(0)))
    variables = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    params = [v for v in variables if isinstance(v, nnx.Param)]
    count = sum(math.prod(v.shape) for v in params)
    param_bytes = sum(
        _shard_elements(v.shape, v.get_metadata().get("out_sharding"), sizes) * v.dtype.itemsize
        for v in params
    )
    accumulator = param_bytes if cfg.optim.grad_accum > 1 else 0
    tokens, no_remat = _activation_bytes(cfg, sizes, remat=False)
    _, full_remat = _activation_bytes(cfg, sizes, remat=True)
    return MemoryPlan(
        devices=devices,
        mesh=sizes,
        parameters=count,
        tokens_per_device=tokens,
        params=param_bytes,
        optimizer=2 * param_bytes,  # AdamW: first and second moments, sharded like the params
        gradients=param_bytes + accumulator,
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
