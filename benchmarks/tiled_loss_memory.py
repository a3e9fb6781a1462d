"""Train-step temporaries with and without the tiled cross-entropy (`train.loss_chunk`).

Lowers and compiles (on CPU, from abstract shapes: no parameter is materialised) the train step
of a config once with `train.loss_chunk=0` and once with `--chunk`, and prints XLA's
`memory_analysis()` of each. Extra arguments are `section.key=value` overrides.

    .venv/bin/python benchmarks/tiled_loss_memory.py --config configs/gpu/llama_1b_sft.yaml \\
        --chunk 256 model.attention=xla
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lm.config import load_config  # noqa: E402
from lm.model.build import build_model  # noqa: E402
from lm.runtime.mesh import batch_sharding, make_mesh  # noqa: E402
from lm.train.objectives import TokenCrossEntropy  # noqa: E402
from lm.train.optim import make_optimizer  # noqa: E402
from lm.train.state import plan_train_state  # noqa: E402
from lm.train.step import make_train_step  # noqa: E402

GIB = 2**30


def compiled_memory(config: str, overrides: list[str]):
    """`memory_analysis()` of the compiled train step of `config` with `overrides`."""
    cfg = load_config(config, overrides)
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    objective = TokenCrossEntropy(cfg.train.z_loss, cfg.train.loss_chunk)
    with jax.set_mesh(mesh):
        graphdef, abstract, shardings, _ = plan_train_state(
            lambda rngs: build_model(cfg, rngs), tx, mesh, cfg.train.seed
        )
        step = make_train_step(graphdef, tx, objective, shardings, cfg.optim.grad_accum)
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        shape, rows = (cfg.data.batch_size, cfg.data.seq_len), batch_sharding(mesh)
        tokens = jax.ShapeDtypeStruct(shape, np.int32, sharding=rows)
        batch = dict.fromkeys(("inputs", "targets", "segment_ids", "positions"), tokens)
        batch["weights"] = jax.ShapeDtypeStruct(shape, np.float32, sharding=rows)
        return step.lower(state, batch).compile().memory_analysis()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpu/llama_1b_sft.yaml")
    parser.add_argument("--chunk", type=int, default=256, help="train.loss_chunk of the tiled run")
    args, overrides = parser.parse_known_args()
    temporaries = {}
    for chunk in (0, args.chunk):
        start = time.perf_counter()
        memory = compiled_memory(args.config, [*overrides, f"train.loss_chunk={chunk}"])
        temporaries[chunk] = memory.temp_size_in_bytes
        print(
            f"loss_chunk={chunk}: temporaries {memory.temp_size_in_bytes / GIB:.2f} GiB, "
            f"arguments {memory.argument_size_in_bytes / GIB:.2f} GiB, "
            f"outputs {memory.output_size_in_bytes / GIB:.2f} GiB "
            f"(compiled in {time.perf_counter() - start:.0f} s)"
        )
    ratio = temporaries[args.chunk] / temporaries[0]
    print(f"tiled / untiled temporaries: {ratio:.3f} ({1 - ratio:.0%} less)")


if __name__ == "__main__":
    main()
