"""The tiled cross-entropy (`train.loss_chunk`) computes what the untiled one does."""

import jax
import jax.extend
import numpy as np
import pytest
from conftest import random_batch, tiny_model
from flax import nnx

from lm.config import ConfigError, MeshConfig, OptimConfig, load_config
from lm.model import Transformer
from lm.model.heads import MaskedLM
from lm.model.lora import LoraModel
from lm.runtime.mesh import batch_sharding, make_mesh
from lm.train.objectives import TokenCrossEntropy
from lm.train.optim import make_optimizer
from lm.train.state import plan_train_state
from lm.train.step import make_train_step

Z_LOSS = 1e-3


def padded_batch() -> dict[str, np.ndarray]:
    """A packed batch whose rows end in different amounts of padding (segment 0, weight 0)."""
    batch = random_batch(seed=1)
    for row, pad in enumerate([0, 3, 5, 9, 0, 1, 7, 12]):
        if pad:
            batch["weights"][row, -pad:] = 0.0
            batch["segment_ids"][row, -pad:] = 0
    return batch


def make_model(kind: str) -> nnx.Module:
    with nnx.use_eager_sharding(False):
        if kind == "mlm":
            return MaskedLM(tiny_model(causal=False, dropout=0.1), rngs=nnx.Rngs(0))
        model = Transformer(tiny_model(dropout=0.1, tie_embeddings=False), rngs=nnx.Rngs(0))
        if kind == "lora":
            model = LoraModel(model, 4, 8.0, ["wq", "wv", "w_up"], rngs=nnx.Rngs(1))
            for i, adapter in enumerate(model.adapters.values()):  # B ≠ 0: adapters matter
                adapter.b[...] = 0.1 * jax.random.normal(jax.random.key(i), adapter.b.shape)
        return model


def assert_trees_close(a, b, rtol=1e-6):
    """Every leaf equal to `rtol` of its own largest magnitude."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max())


@pytest.mark.parametrize("kind", ["causal", "mlm", "lora"])
def test_tiled_loss_metrics_and_gradients_equal_untiled(kind):
    graphdef, params = nnx.split(make_model(kind))
    batch = padded_batch()
    dropout_key = jax.random.key(7)  # the same dropout masks in both paths

    def loss_and_grads(params, loss_chunk):
        objective = TokenCrossEntropy(z_loss=Z_LOSS, loss_chunk=loss_chunk)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            return objective.loss(model, batch, dropout_key, evaluating=True)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    loss_and_grads = jax.jit(loss_and_grads, static_argnums=1)
    (loss, sums), grads = loss_and_grads(params, 0)
    (tiled_loss, tiled_sums), tiled_grads = loss_and_grads(params, 4)
    assert float(tiled_loss) == pytest.approx(float(loss), rel=1e-6)
    assert sorted(tiled_sums) == ["correct_sum", "nll_sum", "weight_sum"]
    assert_trees_close(tiled_sums, sums)
    assert_trees_close(tiled_grads, grads)


def head_matmuls(loss_chunk: int, vocab: int = 80) -> int:
    """dot_generals touching the vocabulary axis in a train step's value-and-gradient."""
    with nnx.use_eager_sharding(False):
        model = Transformer(tiny_model(vocab_size=vocab, tie_embeddings=False), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = random_batch(vocab=vocab)
    objective = TokenCrossEntropy(loss_chunk=loss_chunk)

    def loss_fn(params):
        return objective.loss(nnx.merge(graphdef, params), batch)[0]

    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape")]
            n += eqn.primitive.name == "dot_general" and any(vocab in s for s in shapes)
            subs = [count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
            # A cond runs one branch (here the one its platform lowers): count the largest.
            n += (max(subs) if eqn.primitive.name == "cond" else sum(subs)) if subs else 0
        return n

    return count(jax.make_jaxpr(jax.value_and_grad(loss_fn))(params).jaxpr)


def test_tiled_loss_computes_each_head_matmul_once():
    # Logits, their input's gradient and the unembedding's gradient: three matmuls per slice,
    # as untiled; the logits are never recomputed for the backward pass.
    assert head_matmuls(loss_chunk=0) == 3
    assert head_matmuls(loss_chunk=4) == 3


def train_one_step(loss_chunk: int):
    mesh = make_mesh(MeshConfig(2, 2, 2), jax.devices())
    # A large Adam eps keeps updates proportional to gradients (see test_train.py).
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-3), 10)
    objective = TokenCrossEntropy(z_loss=Z_LOSS, loss_chunk=loss_chunk)
    with jax.set_mesh(mesh):
        graphdef, _, shardings, init = plan_train_state(
            lambda rngs: Transformer(tiny_model(), rngs=rngs), tx, mesh, 0
        )
        step = make_train_step(graphdef, tx, objective, shardings, grad_accum=2)
        state, metrics = step(init(), jax.device_put(padded_batch(), batch_sharding(mesh)))
    return jax.tree.map(np.asarray, state.params), jax.device_get(metrics)


def test_train_step_with_grad_accum_is_the_same_tiled():
    params, metrics = train_one_step(0)
    tiled_params, tiled_metrics = train_one_step(8)
    assert_trees_close(tiled_metrics, metrics)
    assert_trees_close(tiled_params, params)


def test_loss_chunk_must_be_a_proper_divisor_of_the_sequence():
    with pytest.raises(ConfigError, match="train.loss_chunk=48 must be a divisor of data.seq_len"):
        load_config(None, ["data.seq_len=128", "train.loss_chunk=48"])
    with pytest.raises(ConfigError, match="a whole-sequence chunk tiles nothing"):
        load_config(None, ["data.seq_len=128", "train.loss_chunk=128"])
    with pytest.raises(ConfigError, match="train.loss_chunk=-2 is negative"):
        load_config(None, ["train.loss_chunk=-2"])
    assert load_config(None, ["train.loss_chunk=-1"]).train.loss_chunk == -1  # the platform's
    batch = padded_batch()
    with pytest.raises(ValueError, match="loss_chunk=5 must divide the sequence length 16"):
        TokenCrossEntropy(loss_chunk=5).loss(make_model("causal"), batch)
