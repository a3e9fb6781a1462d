"""Ahead-of-time compilation of the real train step for any devices, TPU slices and GPUs included.

With libtpu installed (`pip install 'lm[tpu]'`), `slice_target("v5p-128")` describes a TPU
slice's devices on any host, CPU included (`lm.runtime.gpus.gpu_target` does the same for NVIDIA
GPUs with the CUDA plugin), and `compile_train_step` runs the real compiler on the train step
for them: XLA's per-device memory and the optimized HLO's collectives, before renting the
hardware. Nothing is allocated: the state and batch are abstract shapes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from lm.config import Config, ConfigError
from lm.inference.generator import Generator
from lm.inference.sampling import Sampling
from lm.model.build import build_model
from lm.runtime.mesh import batch_sharding, make_mesh
from lm.runtime.platforms import for_platform
from lm.tasks import task_for
from lm.train.freeze import finetune_optimizer, gate_frozen
from lm.train.objectives import TokenCrossEntropy
from lm.train.optim import make_optimizer
from lm.train.state import abstract_with_shardings, plan_train_state
from lm.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Chip:
    """Datasheet figures of one accelerator: a TPU chip (Cloud TPU system architecture pages)
    or a GPU (`lm.runtime.gpus`)."""

    generation: str  # 'v5p', 'NVIDIA H100 80GB HBM3'
    memory_bytes: int
    peak_bf16_flops: float  # dense
    link_bytes_per_s: float  # to the other devices, one direction (TPU ICI: Gbps / 8)
    memory_bytes_per_s: float  # (decoding reads every weight and cache per token)
    memory: str = "HBM"
    link: str = "ICI"


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to compile for, described on this host, and the datasheet of each."""

    name: str  # as asked for: 'v5p-128', 'h100:8'
    description: str  # 'v5p:4x4x4', '8 x NVIDIA H100 80GB HBM3 on one host'
    compiler: str  # whose XLA backend compiles: 'TPU', 'GPU'
    devices: tuple[jax.Device, ...]
    chip: Chip


CHIPS = {
    "v5e": Chip("v5e", 16 * 2**30, 197e12, 1600e9 / 8, 819e9),
    "v5p": Chip("v5p", 95 * 2**30, 459e12, 4800e9 / 8, 2765e9),
    "v6e": Chip("v6e", 32 * 2**30, 918e12, 3584e9 / 8, 1640e9),
}
# Default slice shapes by chip count: v5e and v6e are 2D tori, v5p a 3D torus.
_SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
    6144: "16x16x24",
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v6lite": "v6e"}


def topology_name(name: str) -> tuple[str, Chip]:
    """(libtpu topology string, chip) of a slice: `v5e-256`, `v5p-128`, `v6e-64` or `v5p:4x4x4`.

    As in Cloud TPU accelerator types, v5p-N counts TensorCores (two per chip); v5e-N and v6e-N
    count chips.
    """
    m = re.fullmatch(r"(\w+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    generation = m and _ALIASES.get(m.group(1), m.group(1))
    if generation not in CHIPS:
        raise ConfigError(
            f"unknown TPU slice {name!r}; use v5e-N, v6e-N, v5p-N (N TensorCores) or a "
            f"topology such as v5p:4x4x4."
        )
    if m.group(3):
        return f"{generation}:{m.group(3)}", CHIPS[generation]
    chips = int(m.group(2)) // 2 if generation == "v5p" else int(m.group(2))
    shapes = _SHAPES_3D if generation == "v5p" else _SHAPES_2D
    if chips not in shapes:
        sizes = sorted(n * 2 if generation == "v5p" else n for n in shapes)
        raise ConfigError(f"no {generation} slice {name!r}; sizes are {sizes}.")
    return f"{generation}:{shapes[chips]}", CHIPS[generation]


def libtpu_available() -> bool:
    """Whether libtpu is importable (found without importing it: that loads the TPU runtime)."""
    return importlib.util.find_spec("libtpu") is not None


def slice_target(name: str) -> Target:
    """TPU slice `name`, described on this host without TPUs."""
    topology, chip = topology_name(name)
    if not libtpu_available():
        raise ConfigError(
            f"planning for TPU slice {name!r} needs libtpu; install it with pip install 'lm[tpu]'."
        )
    # Imported here: it is only useful with libtpu, and a CPU run never needs it.
    from jax.experimental import topologies

    devices = tuple(topologies.get_topology_desc(topology, "tpu").devices)
    return Target(name, topology, "TPU", devices, chip)


_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# `%name = f32[2,3]{1,0} all-gather(...)` or a tuple result `(f32[..], bf16[..]) all-reduce(`.
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(_KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
# A computation's header: `%name (params) -> result {` or `ENTRY %name ...{`.
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEES = re.compile(
    r"\b(calls|to_apply|condition|body|branch_computations)=(\{[^}]*\}|%[\w.\-]+)"
)
_NAME = re.compile(r"%([\w.\-]+)")
# An instruction's name and result type: `%name = bf16[8,16]{1,0} op(...`.
_DEFINES = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s")
# A scan's loop condition: `counter < constant(N)`.
_LIMIT = re.compile(r"s32\[\]\S*\s+constant\((\d+)\)")


class Collective(NamedTuple):
    kind: str
    shapes: tuple[str, ...]  # result arrays, e.g. 'bf16[256,704]'
    bytes: int  # result bytes per device, per execution
    count: int  # executions per step: the trip counts of the loops around it
    traffic: int  # bytes each device sends per execution (see `collectives`)


def _split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """({computation name: its instruction lines}, the entry computation's name)."""
    bodies: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        header = None if line.startswith(" ") else _HEADER.match(line)
        if header:
            current = bodies.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif current is not None:
            current.append(line)
    return bodies, entry


def _executions(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of `entry`.

    A while body runs as often as its condition's `counter < N` says (scanned layers: N
    layers); a loop without such a constant counts once, so its collectives are undercounted.
    """
    callers: dict[str, list[tuple[str, int]]] = {}
    for name, lines in bodies.items():
        for line in lines:
            for field, targets in _CALLEES.findall(line):
                trips = 1
                if field == "body":
                    condition = re.search(r"condition=%([\w.\-]+)", line)
                    limits = _LIMIT.findall("\n".join(bodies.get(condition.group(1), [])))
                    trips = int(limits[0]) if len(limits) == 1 else 1
                for callee in _NAME.findall(targets):
                    callers.setdefault(callee, []).append((name, trips))
    runs: dict[str, int] = {entry: 1}

    def count(name: str) -> int:
        if name not in runs:
            runs[name] = sum(count(caller) * trips for caller, trips in callers.get(name, []))
        return runs[name]

    return {name: count(name) for name in bodies}


def _array_bytes(arrays: Sequence[tuple[str, str]]) -> int:
    return sum(_DTYPE_BYTES[t] * math.prod(int(x) for x in d.split(",") if x) for t, d in arrays)


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an optimized HLO module's text (async ones counted once, at -start),
    with how many times a step executes it and the bytes each device sends.

    Traffic is a bandwidth-optimal ring's, (n-1)/n taken as 1: an all-gather sends its
    result's bytes, a reduce-scatter its operand's, an all-reduce (a reduce-scatter then an
    all-gather) twice its result's; all-to-all and collective-permute their result's.
    """
    bodies, entry = _split_computations(hlo)
    runs = _executions(bodies, entry)
    found = []
    for name, lines in bodies.items():
        defined = {}
        for line in lines:
            d = _DEFINES.match(line)
            if d:
                defined[d.group(1)] = d.group(2)
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            arrays = _ARRAY.findall(m.group(1))
            operands = arrays[:1]
            if m.group(3):  # `-start` results are (operand, result[, scratch]) tuples
                arrays = arrays[1:2]
            elif m.group(2) == "reduce-scatter":
                args = line[m.end() :].split(")")[0]
                operands = _ARRAY.findall(args) or [
                    a for n in _NAME.findall(args) for a in _ARRAY.findall(defined.get(n, ""))
                ]
            result = _array_bytes(arrays)
            traffic = {
                "all-reduce": 2 * result,
                "reduce-scatter": _array_bytes(operands),
            }.get(m.group(2), result)
            shapes = tuple(f"{t}[{d}]" for t, d in arrays)
            found.append(Collective(m.group(2), shapes, result, runs[name], traffic))
    return found


def collective_bytes(found: Sequence[Collective]) -> int:
    """Bytes each device sends per step for `found`, loops counted."""
    return sum(c.traffic * c.count for c in found)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """What the compiler says about one train step on one set of devices (bytes per device)."""

    hlo: str  # optimized HLO text
    mesh: dict[str, int]
    params: int  # parameters held per device, as sharded
    optimizer: int  # optimizer state held per device
    arguments: int  # XLA memory_analysis(): state + batch
    outputs: int
    aliased: int  # outputs written in place of donated arguments
    temporaries: int
    param_bytes_compute: int  # all parameters in the compute dtype (FSDP's ideal traffic / 3)
    compile_s: float
    flops: float  # XLA's cost_analysis() of the compiled step, per device
    bytes_accessed: float  # memory traffic by the same count, per device

    @property
    def custom_calls(self) -> dict[str, int]:
        """{custom-call target: count} of the optimized HLO: library kernels such as cuDNN's
        fused attention (`__cudnn$fmha...`) or cuBLAS GEMMs."""
        return _custom_calls(self.hlo)

    @property
    def peak(self) -> int:
        """Bytes live at once per device: arguments, new outputs and temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


class DoesNotFit(ConfigError):
    """The compiler found no way to fit a step in each device's memory."""


def _compile(lowered: jax.stages.Lowered, what: str) -> jax.stages.Compiled:
    """`lowered` compiled; running out of device memory is one sentence (DoesNotFit)."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        reason = text.split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0].rstrip(".")
        raise DoesNotFit(
            f"The {what} does not fit in device memory ({reason}); shard it over more devices "
            "(mesh.fsdp=-1), lower data.batch_size or set model.remat=full."
        ) from None


def _custom_calls(hlo: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', hlo):
        found[target] = found.get(target, 0) + 1
    return dict(sorted(found.items()))


def _per_device_bytes(tree) -> int:
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def _planned(cfg: Config, devices: Sequence[jax.Device] | None):
    """(mesh, cfg with its `auto` choices made for the devices' platform, optimizer, graphdef,
    abstract train state, its shardings) for `devices` (default: this host's)."""
    mesh = make_mesh(cfg.mesh, devices)
    cfg = for_platform(cfg, mesh.devices.flat[0].platform)
    tx = (
        finetune_optimizer(cfg) if cfg.finetune.task else make_optimizer(cfg.optim, cfg.train.steps)
    )
    # Planned outside `set_mesh`: optax builds placeholder states eagerly, on the default
    # backend, which must not be a deviceless TPU topology's.
    graphdef, abstract, shardings, _ = plan_train_state(lambda r: build_model(cfg, r), tx, mesh, 0)
    return mesh, cfg, tx, graphdef, abstract, shardings


def _objective_and_rows(cfg: Config):
    """(the objective `lm pretrain` or `lm finetune` trains `cfg` with, {batch key: (row shape,
    dtype)}). A task's objective is configured from zero rows: statistics of its train split
    (class weights, target scales) are constants of the step, not its shape."""
    if not cfg.finetune.task:
        length = (cfg.data.seq_len,)
        rows = dict.fromkeys(("inputs", "targets", "segment_ids", "positions"), (length, np.int32))
        return TokenCrossEntropy(cfg.train.z_loss, cfg.train.loss_chunk), rows | {
            "weights": (length, np.float32)
        }
    task = task_for(cfg)
    rows = task.row_shapes(cfg)
    train = {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in rows.items()}
    return gate_frozen(cfg, task.objective(cfg, train)), rows


def compile_train_step(cfg: Config, devices: Sequence[jax.Device] | None = None) -> CompiledStep:
    """Compile the train step `lm pretrain` or `lm finetune` runs for `cfg` (its objective, and
    for a task its trainable parameters) for `devices` (default: this host's) from abstract
    shapes, its `auto` choices made for their platform."""
    mesh, cfg, tx, graphdef, abstract, shardings = _planned(cfg, devices)
    state = abstract_with_shardings(abstract, shardings)
    objective, rows = _objective_and_rows(cfg)
    batch = {
        k: jax.ShapeDtypeStruct((cfg.data.batch_size, *shape), dtype, sharding=batch_sharding(mesh))
        for k, (shape, dtype) in rows.items()
    }
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        step = make_train_step(graphdef, tx, objective, shardings, cfg.optim.grad_accum)
        compiled = _compile(step.lower(state, batch), "train step")
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    itemsize = np.dtype(cfg.model.dtype).itemsize
    return CompiledStep(
        hlo=compiled.as_text(),
        mesh=dict(mesh.shape),
        params=_per_device_bytes(state.params),
        optimizer=_per_device_bytes(state.opt_state),
        arguments=memory.argument_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        param_bytes_compute=sum(
            math.prod(a.shape) * itemsize for a in jax.tree.leaves(abstract.params)
        ),
        compile_s=compile_s,
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
    )


@dataclasses.dataclass(frozen=True)
class CompiledDecode:
    """What the compiler says about one decoding step (one new token for each of `rows` rows
    with a KV cache of `slots` slots), bytes per device."""

    hlo: str
    mesh: dict[str, int]
    rows: int
    slots: int
    params: int  # parameters held per device, as trained and sharded
    cache: int  # the KV cache held per device
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    compile_s: float

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compile_decode_step(cfg: Config, devices: Sequence[jax.Device] | None = None) -> CompiledDecode:
    """Compile the greedy decode step `lm generate` runs for `data.batch_size` rows and a
    `model.max_seq_len`-slot cache, parameters sharded as in training, for `devices`.

    The prefill is compiled first: the cache and logits it returns, in the shardings the
    compiler gave them, are what the decode step receives.
    """
    mesh, cfg, _, graphdef, abstract, shardings = _planned(cfg, devices)
    generator = Generator(nnx.merge(graphdef, abstract.params), None, mesh=mesh)
    params = abstract_with_shardings(abstract.params, shardings.params)
    rows, slots = cfg.data.batch_size, cfg.model.max_seq_len
    tokens = jax.ShapeDtypeStruct((rows, 1), np.int32, sharding=batch_sharding(mesh))
    pads = jax.ShapeDtypeStruct((rows,), np.int32, sharding=batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), np.float32)
    sampling = Sampling(scalar, jax.ShapeDtypeStruct((), np.int32), scalar, scalar, scalar)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        key = jax.eval_shape(lambda: jax.random.key(0))
        prefill = _compile(
            generator._prefill.lower(params, tokens, pads, key, slots=slots), "prefill"
        )
        state = jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
            prefill.out_info,
            prefill.output_shardings,
        )
        compiled = _compile(
            generator._step.lower(params, state, sampling, greedy=True), "decode step"
        )
    memory = compiled.memory_analysis()
    return CompiledDecode(
        hlo=compiled.as_text(),
        mesh=dict(mesh.shape),
        rows=rows,
        slots=slots,
        params=_per_device_bytes(params),
        cache=_per_device_bytes(state.cache.k) + _per_device_bytes(state.cache.v),
        arguments=memory.argument_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        compile_s=time.perf_counter() - start,
    )
