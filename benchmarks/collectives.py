"""Collectives in the compiled train step: kind, operand shape, bytes (CPU-emulated devices).

    python benchmarks/collectives.py configs/pod_1b.yaml mesh.fsdp=8 mesh.data=1 mesh.tensor=1 \
        model.num_layers=2 model.d_model=256 model.d_ff=704 model.vocab_size=512 \
        data.seq_len=128 model.max_seq_len=128 data.batch_size=16

lists every collective of the optimized HLO and compares the total with the FSDP ideal (an
all-gather of every weight forward and backward plus a reduce-scatter of every gradient:
3 x parameter bytes in the compute dtype).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
# `%name = f32[2,3]{1,0} all-gather(...)` or a tuple result `(f32[..], bf16[..]) all-reduce(`.
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(_KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


class Collective(NamedTuple):
    kind: str
    shapes: tuple[str, ...]  # result arrays, e.g. 'bf16[256,704]'
    bytes: int  # result bytes per device


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an optimized HLO module's text (async ones counted once, at -start)."""
    found = []
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        arrays = _ARRAY.findall(m.group(1))
        if m.group(3):  # `-start` results are (operand, result[, scratch]) tuples
            arrays = arrays[1:2]
        shapes = tuple(f"{t}[{d}]" for t, d in arrays)
        nbytes = sum(
            _DTYPE_BYTES[t] * int(np.prod([int(x) for x in d.split(",") if x])) for t, d in arrays
        )
        found.append(Collective(m.group(2), shapes, nbytes))
    return found


def compile_train_step(
    cfg_file: str | None, overrides: Sequence[str], devices: Sequence | None = None
) -> tuple[str, int]:
    """(optimized HLO text of the train step on `devices`, parameter bytes in the compute dtype)."""
    import jax

    from lm.config import load_config
    from lm.model.build import build_model
    from lm.runtime.mesh import batch_sharding, make_mesh
    from lm.train.objectives import TokenCrossEntropy
    from lm.train.optim import make_optimizer
    from lm.train.state import plan_train_state
    from lm.train.step import make_train_step

    cfg = load_config(cfg_file, list(overrides))
    mesh = make_mesh(cfg.mesh, devices)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    # Planned outside `set_mesh`: optax builds placeholder states eagerly, on the default
    # backend, which must not be a deviceless TPU topology's.
    graphdef, abstract, shardings, _ = plan_train_state(lambda r: build_model(cfg, r), tx, mesh, 0)
    with jax.set_mesh(mesh):
        step = make_train_step(graphdef, tx, TokenCrossEntropy(), shardings, cfg.optim.grad_accum)
        shape = (cfg.data.batch_size, cfg.data.seq_len)
        batch = {
            k: jax.ShapeDtypeStruct(
                shape, np.float32 if k == "weights" else np.int32, sharding=batch_sharding(mesh)
            )
            for k in ("inputs", "targets", "weights", "segment_ids", "positions")
        }
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        hlo = step.lower(state, batch).compile().as_text()
    itemsize = np.dtype(cfg.model.dtype).itemsize
    param_bytes = sum(int(np.prod(a.shape)) * itemsize for a in jax.tree.leaves(abstract.params))
    return hlo, param_bytes


def main(argv: list[str]) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    cfg_file = argv[0] if argv and "=" not in argv[0] else None
    hlo, param_bytes = compile_train_step(cfg_file, argv[1:] if cfg_file else argv)
    found = collectives(hlo)
    for c in sorted(found, key=lambda c: (c.kind, -c.bytes)):
        print(f"{c.kind:20s} {c.bytes:>12,d}  {' '.join(c.shapes)}")
    total = sum(c.bytes for c in found)
    print(
        f"{len(found)} collectives, {total:,d} bytes; FSDP ideal 3 x {param_bytes:,d} = "
        f"{3 * param_bytes:,d} ({total / (3 * param_bytes):.2f}x)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
