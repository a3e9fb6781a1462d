"""`lm plan`: the memory estimate agrees with the arrays a real sharded train state holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import pytest
from conftest import tiny_model

from lm.cli import main
from lm.commands.plan import plan_memory
from lm.config import Config, DataConfig, MeshConfig, TrainConfig, load_config
from lm.model.build import build_model
from lm.runtime.mesh import make_mesh
from lm.train.freeze import finetune_optimizer
from lm.train.optim import make_optimizer
from lm.train.state import plan_train_state


def tiny_config(**mesh) -> Config:
    return Config(
        model=tiny_model(),
        mesh=MeshConfig(**mesh),
        data=DataConfig(seq_len=16, batch_size=16),
    )


def per_device_bytes(tree) -> int:
    """Bytes that device 0 holds of every array in `tree`."""
    return sum(
        shard.data.nbytes
        for x in jax.tree.leaves(tree)
        for shard in x.addressable_shards
        if shard.device == jax.devices()[0]
    )


@pytest.mark.parametrize("mesh", [dict(data=-1), dict(data=2, fsdp=2, tensor=2)])
def test_planned_params_and_optimizer_bytes_match_a_real_sharded_state(mesh):
    cfg = tiny_config(**mesh)
    tx = make_optimizer(cfg.optim, 10)
    _, _, _, init = plan_train_state(
        lambda rngs: build_model(cfg, rngs), tx, make_mesh(cfg.mesh), seed=0
    )
    state = init()
    plan = plan_memory(cfg, 8)
    assert plan.params == per_device_bytes(state.params)
    # AdamW's two moments; the real state also holds a few scalar counters.
    assert 0 <= per_device_bytes(state.opt_state) - plan.optimizer <= 64
    assert plan.parameters == sum(x.size for x in jax.tree.leaves(state.params))


def test_sharding_remat_and_batch_move_the_estimate_the_right_way():
    base = plan_memory(tiny_config(data=-1), 8)
    fsdp = plan_memory(tiny_config(data=1, fsdp=-1), 8)
    assert fsdp.params < base.params / 4  # weights split 8 ways, small vectors replicated
    assert fsdp.activations_no_remat == base.activations_no_remat  # same rows per device
    assert base.activations_full_remat < base.activations_no_remat

    double = tiny_config(data=-1)
    double.data = dataclasses.replace(double.data, batch_size=32)
    assert plan_memory(double, 8).activations_no_remat == 2 * base.activations_no_remat
    accum = tiny_config(data=-1)
    accum.optim = dataclasses.replace(accum.optim, grad_accum=2)
    halved = plan_memory(accum, 8)
    assert halved.activations_no_remat == base.activations_no_remat // 2
    assert halved.gradients == 2 * base.gradients  # the accumulator


def test_lm_plan_prints_the_table_and_rejects_a_mesh_that_does_not_fit(capsys):
    assert main(["plan", "--config", "configs/shakespeare.yaml", "--devices", "4"]) == 0
    out = capsys.readouterr().out
    assert "1.31M parameters on 4 devices (data=4 fsdp=1 tensor=1)" in out
    assert "total, full remat" in out
    assert main(["plan", "--config", "configs/shakespeare.yaml", "--devices", "6", "mesh.fsdp=4"])
    assert "cannot fill 6 devices" in capsys.readouterr().err


def test_activation_estimate_scales_with_tokens_and_tensor_parallelism():
    one = plan_memory(tiny_config(data=-1), 8)
    tensor = plan_memory(tiny_config(data=2, tensor=4), 8)
    assert tensor.tokens_per_device == 4 * one.tokens_per_device
    assert tensor.activations_no_remat < 4 * one.activations_no_remat


@pytest.mark.parametrize(
    "path", sorted(str(p) for p in Path(__file__).parent.parent.glob("configs/**/*.yaml"))
)
def test_every_shipped_config_has_a_memory_plan(path):
    plan = plan_memory(load_config(path), 1)
    assert plan.parameters > 0 and plan.total_full_remat <= plan.total_no_remat


def test_planned_lora_optimizer_bytes_match_the_real_frozen_state():
    # Only the adapters and the head train: AdamW holds moments for them alone.
    cfg = load_config("configs/finetune/sentiment.yaml", ["finetune.lora_rank=4", "mesh.data=-1"])
    _, _, _, init = plan_train_state(
        lambda rngs: build_model(cfg, rngs), finetune_optimizer(cfg), make_mesh(cfg.mesh), 0
    )
    state = init()
    plan = plan_memory(cfg, 8)
    assert 0 <= per_device_bytes(state.opt_state) - plan.optimizer <= 64
    assert plan.optimizer < plan.params / 10


def test_tiled_loss_keeps_one_chunk_of_logits():
    cfg = tiny_config(data=-1)
    untiled = plan_memory(cfg, 8, "cpu")
    tiled = plan_memory(dataclasses.replace(cfg, train=TrainConfig(loss_chunk=4)), 8, "cpu")
    # f32 logits and their gradient, 2 x V x 4 bytes per token, now for 4 of the 16 positions.
    logits = untiled.tokens_per_device * 2 * cfg.model.vocab_size * 4
    assert untiled.activations_no_remat - tiled.activations_no_remat == logits * 3 // 4
