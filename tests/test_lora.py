"""LoRA: starts at the base model, and merging the adapters changes no output."""

import jax
import numpy as np
import pytest
from conftest import random_batch, tiny_model
from flax import nnx

from lm.config import Config, FinetuneConfig
from lm.model import Transformer
from lm.model.build import build_model
from lm.model.heads import TaskModel
from lm.model.lora import LoraModel, merge_lora


def _randomise_b(model: LoraModel) -> None:
    for i, adapter in enumerate(model.adapters.values()):
        adapter.b[...] = 0.1 * jax.random.normal(jax.random.key(i), adapter.b.shape)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_merged_model_gives_adapter_logits(scan_layers):
    batch = random_batch()
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    targets = ["wq", "wk", "wv", "wo", "w_up", "w_down"]
    with nnx.use_eager_sharding(False):
        base = Transformer(tiny_model(scan_layers=scan_layers), rngs=nnx.Rngs(0))
        model = LoraModel(base, 4, 8.0, targets, rngs=nnx.Rngs(1))
    graphdef, _ = nnx.split(model)

    @jax.jit
    def outputs(state):  # (base, adapter, merged) logits: one compilation for both checks
        lora = nnx.merge(graphdef, state)
        return lora.base(*args), lora(*args), merge_lora(lora)(*args)

    base_out, adapted, _ = outputs(nnx.state(model))
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base_out))  # B starts at 0
    _randomise_b(model)
    base_out, adapted, merged = map(np.asarray, outputs(nnx.state(model)))
    assert np.abs(adapted - base_out).max() > 1e-2  # the adapters do change the function
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=1e-5)
    merged_model = merge_lora(model)
    assert isinstance(merged_model, Transformer)
    # Plain weights, no adapters: exactly the base model's parameters, with the same shapes.
    shapes = lambda m: {p: v[...].shape for p, v in nnx.to_flat_state(nnx.state(m))}
    assert shapes(merged_model) == shapes(model.base)


def test_build_model_wraps_task_model_and_rejects_unknown_targets():
    f = FinetuneConfig(task="classification", dataset="x.jsonl", labels="a,b", lora_rank=2)
    with nnx.use_eager_sharding(False):
        model = build_model(Config(model=tiny_model(), finetune=f), nnx.Rngs(0))
        assert isinstance(model, LoraModel) and isinstance(model.base, TaskModel)
        expected = ["backbone__blocks__attn__wq", "backbone__blocks__attn__wv"]
        assert sorted(model.adapters) == expected
        with pytest.raises(ValueError, match=r"LoRA targets \['wz'\] are not adaptable"):
            LoraModel(model.base, 2, 4.0, ["wz"], rngs=nnx.Rngs(0))
