"""Every parameter of every model variant declares its roles (weight decay, freeze group, LoRA
target), and the roles say what they should: matrices decay; biases, norms and embedding
tables do not, also in imported GPT-2, Llama and BERT models."""

import dataclasses
import json

import jax
import pytest
from conftest import tiny_model
from flax import nnx

from lm.config import Config, FinetuneConfig, TrainConfig
from lm.model.build import build_model
from lm.model.params import GROUPS, role
from lm.model.transformer import abstract_split
from lm.train.optim import path_names

transformers = pytest.importorskip("transformers")
convert = pytest.importorskip("lm.interop.convert")

_SIZES = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _hf(cls, architecture: str, **kwargs) -> dict:
    """The config.json a `save_pretrained` of this architecture would write."""
    return {**json.loads(cls(**kwargs).to_json_string()), "architectures": [architecture]}


def _finetune(task: str, **kwargs) -> FinetuneConfig:
    return FinetuneConfig(**{"task": task, "dataset": "x.jsonl", "labels": "a,b", **kwargs})


def _variants() -> dict[str, Config]:
    gpt2 = _hf(
        transformers.GPT2Config,
        "GPT2LMHeadModel",
        vocab_size=96,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    llama = _hf(
        transformers.LlamaConfig,
        "LlamaForCausalLM",
        vocab_size=96,
        hidden_size=32,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **_SIZES,
    )
    bert = dict(vocab_size=96, hidden_size=32, max_position_embeddings=32, **_SIZES)
    bert_mlm = _hf(transformers.BertConfig, "BertForMaskedLM", **bert)
    bert_cls = _hf(transformers.BertConfig, "BertForSequenceClassification", **bert)
    unrolled = tiny_model(scan_layers=False, tie_embeddings=False, bias=True, mlp="gelu")
    return {
        "causal (scanned, swiglu, rope)": Config(model=tiny_model()),
        "causal (unrolled, biases, learned positions)": Config(
            model=dataclasses.replace(unrolled, position="learned")
        ),
        "encoder with MLM head": Config(
            model=tiny_model(causal=False), train=TrainConfig(objective="mlm")
        ),
        "classification head with pooler": Config(
            model=tiny_model(), finetune=_finetune("classification", pooler=True)
        ),
        "regression head": Config(
            model=tiny_model(), finetune=_finetune("regression", labels="", label_column="y")
        ),
        "token-label head": Config(model=tiny_model(), finetune=_finetune("token_labels")),
        "text-to-text": Config(model=tiny_model(), finetune=_finetune("text_to_text")),
        "LoRA on every matrix": Config(
            model=tiny_model(),
            finetune=_finetune(
                "classification", lora_rank=2, lora_targets="wq,wk,wv,wo,w_gate,w_up,w_down"
            ),
        ),
        "GPT-2 import": convert.config_from_hf(gpt2),
        "Llama import": convert.config_from_hf(llama),
        "BERT MLM import": convert.config_from_hf(bert_mlm),
        "BERT classifier import": convert.config_from_hf(bert_cls, ["finetune.dataset=x.jsonl"]),
    }


def _roles(cfg: Config) -> dict[str, tuple[bool, str, tuple[int, int] | None]]:
    """'path/to/param' -> (decay, group, lora) of every parameter `cfg`'s model has."""
    with nnx.use_eager_sharding(False):
        _, state = abstract_split(lambda: build_model(cfg, nnx.Rngs(0)))
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {
        "/".join(path_names(path)): (role(v, "decay"), role(v, "group"), role(v, "lora"))
        for path, v in leaves
    }


VARIANTS = _variants()

# Parameter names that are projection matrices (decayed); every other name is a bias, a norm
# parameter or an embedding table (not decayed).
MATRICES = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "unembed", "w_transform"}
MATRICES |= {"kernel", "a", "b"}  # task-head dense layers; LoRA's A and B


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_declares_roles_and_only_matrices_decay(name):
    roles = _roles(VARIANTS[name])
    assert roles
    for path, (decay, group, lora) in roles.items():
        leaf = path.split("/")[-1]
        assert decay == (leaf in MATRICES), (path, decay)
        assert group in GROUPS, (path, group)
        assert (lora is not None) == (leaf in {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})
        if path.startswith(("embed", "pos_embed", "type_embed", "backbone/embed")):
            assert group == "embedding", path
        if "/blocks/" in f"/{path}":
            assert group == "block", path


def test_gpt2_and_bert_imports_leave_biases_norms_and_embeddings_undecayed():
    gpt2 = _roles(VARIANTS["GPT-2 import"])
    assert gpt2["blocks/attn/bq"] == (False, "block", None)
    assert gpt2["blocks/attn/bo"] == (False, "block", None)
    assert gpt2["blocks/mlp/b_up"] == (False, "block", None)
    assert gpt2["blocks/mlp/b_down"] == (False, "block", None)
    assert gpt2["blocks/attn_norm/bias"] == (False, "block", None)
    assert gpt2["pos_embed"] == (False, "embedding", None)
    assert gpt2["blocks/attn/wq"] == (True, "block", (1, 2))
    assert gpt2["blocks/attn/wo"] == (True, "block", (2, 1))
    bert = _roles(VARIANTS["BERT MLM import"])
    assert bert["backbone/type_embed"] == (False, "embedding", None)
    assert bert["backbone/embed_norm/scale"] == (False, "embedding", None)
    assert bert["head/b_transform"] == (False, "head", None)
    assert bert["head/b_output"] == (False, "head", None)
    assert bert["head/w_transform"] == (True, "head", None)
    classifier = _roles(VARIANTS["BERT classifier import"])
    assert classifier["head/pooler/bias"] == (False, "head", None)
    assert classifier["head/classifier/kernel"] == (True, "head", None)


def test_groups_name_the_part_of_the_network():
    causal = _roles(VARIANTS["causal (unrolled, biases, learned positions)"])
    assert causal["final_norm/scale"][1] == "final_norm"
    assert causal["unembed"] == (True, "unembed", None)
    assert causal["blocks/1/mlp/w_up"] == (True, "block", (1, 1))
    lora = _roles(VARIANTS["LoRA on every matrix"])
    adapters = {p: r for p, r in lora.items() if p.startswith("adapters/")}
    assert len(adapters) == 2 * 7 and all(r == (True, "adapter", None) for r in adapters.values())
