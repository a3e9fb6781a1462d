"""Run directories: params-only checkpoints load back exactly, onto any mesh, with clear errors."""

import jax
import numpy as np
import pytest
from conftest import tiny_model
from flax import nnx

from lm.config import Config, DataConfig, MeshConfig
from lm.model.build import build_model
from lm.run_dir import load_run, write_params_run
from lm.runtime.mesh import make_mesh


def test_written_params_run_loads_back_exactly_on_a_sharded_mesh(tmp_path):
    cfg = Config(model=tiny_model(), data=DataConfig(seq_len=16))
    with nnx.use_eager_sharding(False):
        params = nnx.state(build_model(cfg, nnx.Rngs(3)))
    write_params_run(tmp_path, cfg, params, {"source": "test"})

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    run = load_run(tmp_path, mesh=mesh)
    assert run.step == 0 and run.config == cfg and run.tokenizer is None
    for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(run.params), strict=True):
        np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
    embed = run.params["embed"][...]
    assert embed.sharding.mesh.shape == mesh.shape and not embed.sharding.is_fully_replicated


def test_load_run_names_missing_run_dir_and_missing_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path / "nope")
    cfg = Config(model=tiny_model(), data=DataConfig(seq_len=16))
    with nnx.use_eager_sharding(False):
        write_params_run(tmp_path, cfg, nnx.state(build_model(cfg, nnx.Rngs(0))))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7; it has steps \[0\]"):
        load_run(tmp_path, step=7)
