"""Collectives in the compiled train step: kind, operand shape, bytes (CPU-emulated devices).

    python benchmarks/collectives.py configs/pod_1b.yaml mesh.fsdp=8 mesh.data=1 mesh.tensor=1 \\
        model.num_layers=2 model.d_model=256 model.d_ff=704 model.vocab_size=512 \\
        data.seq_len=128 model.max_seq_len=128 data.batch_size=16

lists every collective of the optimized HLO (x: executions per step, scanned layers counted)
and compares the total with the FSDP ideal (an
all-gather of every weight forward and backward plus a reduce-scatter of every gradient:
3 x parameter bytes in the compute dtype). For a TPU slice's compiler use
`lm plan --topology` (lm/runtime/aot.py holds the compile and the HLO parsing for both).
"""

from __future__ import annotations

import os
import sys

import jax

from lm.config import load_config
from lm.runtime.aot import collective_bytes, collectives, compile_train_step


def main(argv: list[str]) -> None:
    # Eight emulated CPU devices, as in the tests; set before JAX starts its backends.
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
    jax.config.update("jax_num_cpu_devices", 8)
    cfg_file = argv[0] if argv and "=" not in argv[0] else None
    step = compile_train_step(load_config(cfg_file, argv[1:] if cfg_file else argv))
    found = collectives(step.hlo)
    for c in sorted(found, key=lambda c: (c.kind, -c.bytes)):
        print(f"{c.kind:20s} {c.bytes:>12,d} x{c.count:<4d} {' '.join(c.shapes)}")
    total = collective_bytes(found)
    ideal = 3 * step.param_bytes_compute
    print(
        f"{len(found)} collectives, {total:,d} bytes; FSDP ideal 3 x "
        f"{step.param_bytes_compute:,d} = {ideal:,d} ({total / ideal:.2f}x)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
