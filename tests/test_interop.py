"""Hugging Face interop: tiny random GPT-2 / Llama / BERT from `transformers` match our logits
(on 1 device and on a (2,2,2) mesh), round-trip through safetensors bit for bit, and bad
input is named."""

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm.config import MeshConfig  # noqa: E402
from lm.interop.convert import from_hf, import_hf, to_hf  # noqa: E402
from lm.parallel import make_mesh  # noqa: E402
from lm.runs import load_run  # noqa: E402

VOCAB, LENGTH = 96, 12


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=64
    )
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def _bert_config():
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )


BUILDERS = {
    "gpt2": _gpt2,
    "llama": _llama,
    "bert_mlm": lambda: transformers.BertForMaskedLM(_bert_config()),
}


def _perturb(model) -> None:
    """Random values for every tensor, so zero biases or unit norms cannot hide a mapping bug."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


@pytest.fixture(scope="module", params=list(BUILDERS))
def hf_model(request, tmp_path_factory):
    """(name, HF model directory, token ids [4, L], HF logits) for each architecture."""
    torch.manual_seed(0)
    model = BUILDERS[request.param]().eval()
    _perturb(model)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(path)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (4, LENGTH))
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.numpy()
    return request.param, path, tokens, logits


def _logits(graphdef, params, tokens, mesh) -> np.ndarray:
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    with jax.set_mesh(mesh):
        return np.asarray(forward(params, tokens.astype(np.int32)))


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_imported_logits_match_transformers(hf_model, mesh_shape):
    _, path, tokens, expected = hf_model
    data, fsdp, tensor = mesh_shape
    devices = jax.devices()[: data * fsdp * tensor]
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)
    _, graphdef, params = import_hf(path, mesh)
    placed = jax.tree.leaves(params)[0].sharding
    assert placed.mesh.devices.size == len(devices)
    np.testing.assert_allclose(_logits(graphdef, params, tokens, mesh), expected, atol=1e-4)


def test_round_trip_gives_identical_tensors_and_a_clean_reload(hf_model, tmp_path):
    name, path, tokens, expected = hf_model
    from_hf(path, tmp_path / "run")
    run = load_run(tmp_path / "run")
    np.testing.assert_allclose(
        _logits(run.graphdef, run.params, tokens, run.mesh), expected, atol=1e-4
    )
    architecture = to_hf(tmp_path / "run", tmp_path / "out")
    original, written = (
        load_file(path / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    reloaded, info = getattr(transformers, architecture).from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        again = reloaded.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(again, expected, atol=1e-5)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    )
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        from_hf(tmp_path, tmp_path / "run")


def test_missing_tensor_is_named(hf_model, tmp_path):
    _, path, _, _ = hf_model
    tensors = load_file(path / "model.safetensors")
    dropped = sorted(tensors)[len(tensors) // 2]
    del tensors[dropped]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=re.escape(f"no tensor '{dropped}'")):
        from_hf(tmp_path, tmp_path / "run")
