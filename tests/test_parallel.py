"""Mesh invariance: one train step gives the single-device loss and gradients on every mesh."""

import functools

import jax
import numpy as np
import pytest
from conftest import random_batch, tiny_model
from flax import nnx
from jax.sharding import PartitionSpec as P

from lm.config import MeshConfig, OptimConfig, load_config
from lm.model import Transformer
from lm.runtime.aot import collectives, compile_train_step
from lm.runtime.mesh import batch_sharding, logical_to_spec, make_mesh
from lm.train.objectives import TokenCrossEntropy
from lm.train.optim import make_optimizer
from lm.train.state import plan_train_state
from lm.train.step import make_train_step

MESHES = [(2, 2, 2), (1, 8, 1), (8, 1, 1), (1, 2, 4)]


def loss_and_grads(mesh_shape, cfg, train_step=True):
    """Loss, gradients (as numpy) and the state after one step (with its loss) on a mesh of that
    shape; without `train_step`, the initial state and no step loss (one compilation fewer)."""
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(MeshConfig(*mesh_shape), devices)
    tx = make_optimizer(OptimConfig(), 10)
    batch = random_batch()
    with jax.set_mesh(mesh):
        graphdef, _, shardings, init = plan_train_state(
            lambda rngs: Transformer(cfg, rngs=rngs), tx, mesh, seed=0
        )
        state = init()
        objective = TokenCrossEntropy()

        @jax.jit
        def grads_of(params, batch):
            def loss(p):
                total, sums = objective.loss(nnx.merge(graphdef, p), batch)
                return total / sums["weight_sum"].sum()

            return jax.value_and_grad(loss)(params)

        placed = jax.device_put(batch, batch_sharding(mesh))
        loss, grads = grads_of(state.params, placed)
        step_loss = None
        if train_step:
            step = make_train_step(graphdef, tx, objective, shardings)
            state, metrics = step(state, placed)
            step_loss = float(metrics["loss"])
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(grads)}
    return float(loss), flat, state, step_loss


@functools.cache
def tiny_on_mesh(mesh_shape):
    """`loss_and_grads` of the default tiny model, computed once per mesh for this module."""
    return loss_and_grads(mesh_shape, tiny_model())


@pytest.fixture(scope="module")
def single_device():
    return tiny_on_mesh((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_step_loss_and_grads_match_single_device(mesh_shape, single_device):
    loss1, grads1, _, step_loss1 = single_device
    loss, grads, state, step_loss = tiny_on_mesh(mesh_shape)
    assert loss == pytest.approx(loss1, rel=1e-5)
    assert step_loss == pytest.approx(step_loss1, rel=1e-5)
    for name, g1 in grads1.items():
        np.testing.assert_allclose(grads[name], g1, rtol=1e-5, atol=1e-7, err_msg=name)


def test_parameters_are_really_sharded_on_the_mesh():
    _, _, state, _ = tiny_on_mesh((1, 2, 4))  # also one of MESHES: computed once
    specs = {
        jax.tree_util.keystr(k): v.sharding.spec for k, v in jax.tree.leaves_with_path(state.params)
    }
    # scanned blocks: [layers, embed, heads, kv]; embed→fsdp, heads→tensor (4 heads / 4)
    assert specs["['blocks']['attn']['wq'].value"] == P(None, "fsdp", "tensor", None)
    # 2 kv heads cannot split 4 ways: replicated on 'tensor' rather than failing
    assert specs["['blocks']['attn']['wk'].value"] == P(None, "fsdp", None, None)
    assert specs["['blocks']['mlp']['w_up'].value"] == P(None, "fsdp", "tensor")
    assert specs["['embed'].value"] == P("tensor", "fsdp")
    mu = state.opt_state[1][0].mu  # AdamW moments follow their parameters
    assert mu["blocks"]["mlp"]["w_up"][...].sharding.spec == P(None, "fsdp", "tensor")
    shard = state.params["blocks"]["mlp"]["w_up"][...].addressable_shards[0]
    assert shard.data.shape == (2, 32 // 2, 64 // 4)


def test_logical_rules_drop_axes_that_do_not_divide():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert logical_to_spec(("act_batch", "act_length"), (8, 16), sizes) == P(("data", "fsdp"), None)
    assert logical_to_spec(("act_batch", "act_length"), (1, 16), sizes) == P(None, None)
    assert logical_to_spec(("vocab", "embed"), (63, 32), sizes) == P(None, "fsdp")


@pytest.mark.parametrize(
    "overrides", [dict(scan_layers=False), dict(attention="math", remat="full")]
)
def test_model_variants_match_on_mesh(overrides, single_device):
    # Loss and gradients are compared; no train step to compile.
    base, base_grads, _, _ = loss_and_grads((1, 1, 1), tiny_model(**overrides), train_step=False)
    sharded, grads, _, _ = loss_and_grads((2, 2, 2), tiny_model(**overrides), train_step=False)
    assert sharded == pytest.approx(base, rel=1e-5)
    for name, g1 in base_grads.items():
        np.testing.assert_allclose(grads[name], g1, rtol=1e-5, atol=1e-7, err_msg=name)
    if "scan_layers" not in overrides:  # same parameters, different lowering: same loss and grads
        assert base == pytest.approx(single_device[0], rel=1e-5)
        for name, g1 in single_device[1].items():
            np.testing.assert_allclose(base_grads[name], g1, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("tensor, kv_heads", [(2, 4), (4, 4), (4, 2)])
def test_tensor_parallel_attention_moves_no_heads_between_devices(tensor, kv_heads):
    # Q, K and V keep their own heads' shards: no collective-permute or all-to-all re-lays out
    # a concatenated QKV in any layer, and each layer costs only the Megatron all-reduces.
    cfg = load_config(
        None,
        [
            f"mesh.data={8 // tensor}", "mesh.fsdp=1", f"mesh.tensor={tensor}",
            "model.num_layers=2", "model.d_model=64", "model.d_ff=128", "model.num_heads=8",
            f"model.num_kv_heads={kv_heads}", "model.vocab_size=128", "data.seq_len=16",
            "model.max_seq_len=16", "data.batch_size=8", "model.scan_layers=false",
        ],
    )  # fmt: skip
    found = collectives(compile_train_step(cfg).hlo)
    assert {c.kind for c in found} <= {"all-reduce", "all-gather"}, found
