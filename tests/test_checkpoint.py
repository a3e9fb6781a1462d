"""Checkpoints restore bit for bit onto other meshes, and a resumed run repeats a straight one."""

import json
from dataclasses import replace

import jax
import numpy as np
import pytest
from conftest import random_batch, tiny_model

from lm.commands.pretrain import pretrain
from lm.config import CheckpointConfig, MeshConfig, OptimConfig
from lm.data.tokenizer import load_tokenizer
from lm.model import Transformer
from lm.runtime.mesh import batch_sharding, make_mesh
from lm.train.checkpoint import Checkpointer
from lm.train.objectives import TokenCrossEntropy
from lm.train.optim import make_optimizer
from lm.train.state import plan_train_state
from lm.train.step import make_train_step


def setup(mesh_shape, seed=0):
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    tx = make_optimizer(OptimConfig(), 10)
    with jax.set_mesh(mesh):
        graphdef, _, shardings, init = plan_train_state(
            lambda rngs: Transformer(tiny_model(), rngs=rngs), tx, mesh, seed
        )
        state = init()
    step = make_train_step(graphdef, tx, TokenCrossEntropy(), shardings)
    return mesh, state, shardings, step


def run_step(mesh, step, state, seed):
    with jax.set_mesh(mesh):
        return step(state, jax.device_put(random_batch(seed=seed), batch_sharding(mesh)))


def test_save_on_2x2x2_restores_bit_identical_on_other_meshes(tmp_path):
    mesh, state, _, step = setup((2, 2, 2))
    state, _ = run_step(mesh, step, state, seed=1)  # non-trivial optimizer state
    saved = jax.tree.map(np.asarray, state)
    checkpointer = Checkpointer(tmp_path / "ckpt", CheckpointConfig())
    checkpointer.save(1, state, {"step": 1})
    checkpointer.close()
    _, expected_metrics = run_step(mesh, step, state, seed=2)
    for target in [(8, 1, 1), (1, 1, 1)]:
        mesh2, fresh, shardings2, step2 = setup(target, seed=7)
        restored, meta = Checkpointer(tmp_path / "ckpt", CheckpointConfig()).restore(
            1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh), shardings2
        )
        assert meta == {"step": 1}
        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
        assert restored.params["embed"][...].sharding.mesh.shape == mesh2.shape
        _, metrics = run_step(mesh2, step2, restored, seed=2)
        # Bitwise: the same step from the never-saved state placed on this mesh.
        _, direct = run_step(mesh2, step2, jax.device_put(saved, shardings2), seed=2)
        assert float(metrics["loss"]) == float(direct["loss"])
        # Across meshes only the reduction order differs.
        assert float(metrics["loss"]) == pytest.approx(float(expected_metrics["loss"]), rel=1e-6)


def read_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


@pytest.mark.parametrize("mesh", [MeshConfig(-1, 1, 1), MeshConfig(2, 2, 2)])
def test_resumed_run_repeats_the_straight_run_bitwise(tiny_text_config, tmp_path, mesh):
    cfg = tiny_text_config
    cfg.mesh = mesh
    # The sample comes after training (test_pretrain_cli checks it): not compiled here.
    cfg.train = replace(cfg.train, sample_tokens=0)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    cfg.train = replace(cfg.train, run_dir=str(straight_dir))
    pretrain(cfg)
    cfg.train = replace(cfg.train, run_dir=str(resumed_dir), stop_at=3)
    pretrain(cfg)  # "preempted" after step 3, checkpoint at 3
    # each run dir trained its own tokenizer on the same corpus: identical vocabularies
    tokenizers = [load_tokenizer(d / "tokenizer.model") for d in (straight_dir, resumed_dir)]
    pieces = [[t._sp.id_to_piece(i) for i in range(t.vocab_size)] for t in tokenizers]
    assert pieces[0] == pieces[1]
    assert Checkpointer(resumed_dir / "checkpoints", CheckpointConfig()).latest_step() == 3
    cfg.train = replace(cfg.train, stop_at=0)
    pretrain(cfg)
    straight, resumed = read_losses(straight_dir), read_losses(resumed_dir)
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]


def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_one_bitwise(
    tiny_text_config, tmp_path, capsys
):
    cfg = tiny_text_config
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    cfg.train = replace(cfg.train, run_dir=str(straight_dir), sample_tokens=0)
    pretrain(cfg)
    cfg.train = replace(cfg.train, run_dir=str(resumed_dir), stop_at=5)
    pretrain(cfg)  # checkpoints at 3 and 5
    (resumed_dir / "checkpoints" / "5" / "state" / "_METADATA").unlink()
    cfg.train = replace(cfg.train, stop_at=0)
    capsys.readouterr()
    pretrain(cfg)
    out = capsys.readouterr().out
    assert "checkpoint 5 is corrupt (state/_METADATA is missing); moved it to" in out
    assert "resumed from step 3" in out
    straight, resumed = read_losses(straight_dir), read_losses(resumed_dir)
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
