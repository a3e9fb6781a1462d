"""`lm finetune` end to end: starting weights, freezing, LoRA export, resume, mesh parity."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_model
from flax import nnx

from lm.cli import main
from lm.commands.finetune import finetune
from lm.config import (
    Config,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    MeshConfig,
    OptimConfig,
    load_config,
)
from lm.data.tokenizer import train_tokenizer
from lm.model import Transformer
from lm.model.build import build_model
from lm.run_dir import load_run, write_params_run
from lm.runtime.mesh import batch_sharding, make_mesh
from lm.tasks.classification import SequenceClassification
from lm.train.freeze import (
    finetune_optimizer,
    freeze,
    gate_frozen,
    trainable_groups,
    trainable_mask,
)
from lm.train.init_from import copy_backbone
from lm.train.optim import make_optimizer
from lm.train.state import plan_train_state
from lm.train.step import make_train_step

VOCAB = 300
WORDS = ["the", "king", "queen", "and", "of", "to", "my", "lord", "is", "what", "thou"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(run dir of a 'pretrained' causal LM with its tokenizer, JSONL records of 3 classes)."""
    root = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    records = []
    for _ in range(96):
        words = list(rng.choice(WORDS, 6))
        label = ["king" in words, "queen" in words].count(True)  # 0, 1 or 2 royals
        records.append({"text": " ".join(words), "label": ["none", "one", "both"][label]})
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = root / "pretrained"
    cfg = Config(model=_model(), data=DataConfig(seq_len=16))
    with nnx.use_eager_sharding(False):
        params = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(7)))
    write_params_run(run, cfg, params)
    texts = [r["text"] for r in records] * 4
    train_tokenizer(texts, run / "tokenizer.model", VOCAB)
    return run, root / "records.jsonl"


def _model(**overrides):
    return tiny_model(vocab_size=VOCAB, **overrides)


def _config(tmp_path, pretrained, *overrides):
    run, records = pretrained
    return load_config(
        None,
        [
            "model.vocab_size=300",
            "model.d_model=32",
            "model.num_layers=2",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.d_ff=64",
            "model.max_seq_len=16",
            "data.seq_len=16",
            "data.batch_size=8",
            "data.validation_fraction=0.25",
            "finetune.task=classification",
            f"finetune.dataset={records}",
            "finetune.labels=none,one,both",
            f"finetune.init_from={run}",
            f"train.run_dir={tmp_path / 'run'}",
            "train.steps=6",
            "train.eval_every=2",
            "train.log_every=1",
            "checkpoint.every=2",
            "optim.warmup_steps=0",
            *overrides,
        ],
    )


def _leaves(state, prefix=()):
    return {
        p[len(prefix) :]: np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(state)
        if p[: len(prefix)] == prefix
    }


def test_copy_backbone_copies_exactly_leaves_head_fresh_and_names_mismatches(pretrained):
    source = load_run(pretrained[0]).params
    f = FinetuneConfig(task="classification", dataset="x.jsonl", labels="a,b")
    with nnx.use_eager_sharding(False):
        fresh = nnx.state(build_model(Config(model=_model(), finetune=f), nnx.Rngs(0)))
    copied = copy_backbone(fresh, source, ("backbone",), "RUN")
    src = _leaves(source)
    assert _leaves(copied, ("backbone",)).keys() == src.keys()
    for path, value in _leaves(copied, ("backbone",)).items():
        np.testing.assert_array_equal(value, src[path])
    for path, value in _leaves(fresh, ("head",)).items():
        np.testing.assert_array_equal(_leaves(copied, ("head",))[path], value)
    # A task run's params hold the backbone under 'backbone': the same weights come out.
    again = copy_backbone(fresh, copied, ("backbone",), "RUN")
    np.testing.assert_array_equal(
        np.asarray(again["backbone"]["embed"].get_value()), src[("embed",)]
    )

    with nnx.use_eager_sharding(False):
        wider = nnx.state(build_model(Config(model=_model(d_ff=96), finetune=f), nnx.Rngs(0)))
    with pytest.raises(
        ConfigError,
        match=r"init_from RUN: parameter 'blocks/mlp/w_down' has "
        r"shape \(2, 64, 32\) in the checkpoint but \(2, 96, 32\) in this config",
    ):
        copy_backbone(wider, source, ("backbone",), "RUN")


def test_head_only_finetune_keeps_backbone_bit_identical_and_stops_early(tmp_path, pretrained):
    cfg = _config(
        tmp_path, pretrained, "finetune.trainable=head", "finetune.patience=1", "optim.lr=1e-7"
    )
    final = finetune(cfg)
    run = load_run(tmp_path / "run")
    assert run.step == 4  # eval @2 sets the best, eval @4 does not improve: stop (patience 1)
    source = _leaves(load_run(pretrained[0]).params)
    for path, value in _leaves(run.params, ("backbone",)).items():
        np.testing.assert_array_equal(value, source[path])
    with nnx.use_eager_sharding(False):
        fresh = _leaves(nnx.state(build_model(cfg, nnx.Rngs(cfg.train.seed))), ("head",))
    trained = _leaves(run.params, ("head",))
    assert any(not np.array_equal(trained[p], fresh[p]) for p in fresh)
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == 2 and best["metric"] == "accuracy"
    assert load_run(tmp_path / "run" / "best").step == 2
    assert {"validation/accuracy", "validation/macro_f1", "validation/loss"} <= final.keys()


@pytest.mark.slow  # a whole LoRA fine-tuning run and export
def test_lora_finetune_freezes_base_and_exports_an_equivalent_merged_run(tmp_path, pretrained):
    cfg = _config(
        tmp_path,
        pretrained,
        "finetune.lora_rank=2",
        "finetune.lora_targets=wq,wv,w_up",
        "train.steps=2",
        "optim.lr=1e-2",
    )
    finetune(cfg)
    adapted, merged = load_run(tmp_path / "run"), load_run(tmp_path / "run" / "merged")
    source = _leaves(load_run(pretrained[0]).params)
    for path, value in _leaves(adapted.params, ("base", "backbone")).items():
        np.testing.assert_array_equal(value, source[path])
    assert merged.config.finetune.lora_rank == 0
    tokens = np.asarray(np.random.default_rng(0).integers(7, VOCAB, (2, 16)), np.int32)
    lora_out = np.asarray(jax.jit(lambda p: nnx.merge(adapted.graphdef, p)(tokens))(adapted.params))
    plain_out = np.asarray(jax.jit(lambda p: nnx.merge(merged.graphdef, p)(tokens))(merged.params))
    np.testing.assert_allclose(plain_out, lora_out, atol=1e-5, rtol=1e-5)


def _train_losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


TRAINABLE_MODES = {
    "all": (),
    "head": ("finetune.trainable=head",),
    "last_k_scanned": ("finetune.trainable=last_k",),
    "last_k_unrolled": ("finetune.trainable=last_k", "model.scan_layers=false"),
    "lora": ("finetune.lora_rank=2", "finetune.lora_targets=wq,wv"),
}


@pytest.mark.parametrize("mode", list(TRAINABLE_MODES))
def test_resumed_finetune_repeats_an_uninterrupted_one_bitwise(tmp_path, pretrained, mode):
    """Frozen parameters leave optax MaskedNodes in the optimizer state; resuming restores them."""
    overrides = (*TRAINABLE_MODES[mode], "train.steps=4", "optim.lr=1e-2")
    if mode == "last_k_unrolled":  # a backbone of unrolled blocks to start from
        run = tmp_path / "unrolled"
        cfg = Config(model=_model(scan_layers=False), data=DataConfig(seq_len=16))
        with nnx.use_eager_sharding(False):
            write_params_run(run, cfg, nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(7))))
        shutil.copyfile(pretrained[0] / "tokenizer.model", run / "tokenizer.model")
        pretrained = run, pretrained[1]
    finetune(_config(tmp_path / "a", pretrained, *overrides))
    finetune(_config(tmp_path / "b", pretrained, *overrides, "train.stop_at=2"))
    finetune(_config(tmp_path / "b", pretrained, *overrides))
    straight, resumed = load_run(tmp_path / "a" / "run"), load_run(tmp_path / "b" / "run")
    assert straight.step == resumed.step == 4
    losses = _train_losses(tmp_path / "a" / "run"), _train_losses(tmp_path / "b" / "run")
    assert [losses[1][s] for s in (3, 4)] == [losses[0][s] for s in (3, 4)]
    b = _leaves(resumed.params)
    for path, value in _leaves(straight.params).items():
        np.testing.assert_array_equal(value, b[path])
    if mode == "lora":  # the resumed run's export replaced the one made at step 2
        merged = _leaves(load_run(tmp_path / "b" / "run" / "merged").params)
        for path, value in _leaves(load_run(tmp_path / "a" / "run" / "merged").params).items():
            np.testing.assert_array_equal(value, merged[path])


def test_finetune_step_on_mesh_222_matches_one_device(pretrained, tmp_path):
    cfg = _config(tmp_path, pretrained, "finetune.pooling=mean", "finetune.class_weights=1,2,3")
    batch = _class_batch()
    objective = SequenceClassification(class_weights=(1.0, 2.0, 3.0), label_smoothing=0.1)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10)
    results = []
    for shape in [(2, 2, 2), (1, 1, 1)]:
        mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
        with jax.set_mesh(mesh):
            graphdef, _, shardings, init = plan_train_state(
                lambda rngs: build_model(cfg, rngs), tx, mesh, 0
            )
            step = make_train_step(graphdef, tx, objective, shardings, grad_accum=2)
            _, metrics = step(init(), jax.device_put(batch, batch_sharding(mesh)))
            results.append(jax.device_get(metrics))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-5)


def test_finetune_config_errors_name_the_fix(tmp_path, pretrained, capsys):
    with pytest.raises(ConfigError, match="finetune.task is empty"):
        finetune(_config(tmp_path, pretrained, "finetune.task="))
    with pytest.raises(ConfigError, match="finetune.metric must be one of"):
        finetune(_config(tmp_path, pretrained, "finetune.metric=pearson"))
    with pytest.raises(ConfigError, match="text_to_text trains the language model itself"):
        finetune(
            _config(tmp_path, pretrained, "finetune.task=text_to_text", "finetune.trainable=head")
        )
    assert main(["finetune", "finetune.task=classification"]) == 2  # no dataset: usage error
    assert "finetune.dataset is empty" in capsys.readouterr().err


def test_last_k_trains_last_blocks_final_norm_and_head_and_frozen_get_no_adam_state():
    f = FinetuneConfig(
        task="classification", dataset="x.jsonl", labels="a,b", trainable="last_k", last_k=1
    )
    cfg = Config(model=tiny_model(scan_layers=False, tie_embeddings=False), finetune=f)
    with nnx.use_eager_sharding(False):
        params = nnx.state(build_model(cfg, nnx.Rngs(0)))
    names = trainable_groups(cfg)
    mask = {
        "/".join(map(str, p[:-1])): bool(m)
        for p, m in jax.tree_util.tree_flatten_with_path(trainable_mask(params, names))[0]
        for p in [[getattr(k, "key", getattr(k, "name", k)) for k in p]]
    }
    trained = sorted(k for k, m in mask.items() if m)
    assert trained == sorted(
        [k for k in mask if k.startswith(("backbone/blocks/1/", "backbone/final_norm", "head/"))]
    )
    assert not mask["backbone/embed"] and not mask["backbone/unembed"]
    opt_state = freeze(make_optimizer(OptimConfig(), 10), names).init(params)
    moments = [x for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0]
    assert len(moments) == 2 * len(trained)  # Adam's mu and nu for trainable params only


@pytest.mark.slow  # a whole SFT run with greedy decoding
def test_text_to_text_finetune_scores_greedy_answers(tmp_path, pretrained):
    cfg = _config(
        tmp_path,
        pretrained,
        "finetune.task=text_to_text",
        "finetune.labels=",
        "finetune.max_new_tokens=4",
        "finetune.generate_examples=8",
        "train.steps=2",
    )
    final = finetune(cfg)
    assert {"validation/exact_match", "validation/token_f1", "validation/loss"} <= final.keys()
    assert 0.0 <= final["validation/token_f1"] <= 1.0
    assert load_run(tmp_path / "run").step == 2


def _class_batch() -> dict[str, np.ndarray]:
    """8 right-padded classification rows of 16 tokens."""
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(7, VOCAB, (8, 16)).astype(np.int32),
        "segment_ids": (np.arange(16) < rng.integers(4, 17, (8, 1))).astype(np.int32),
        "label": rng.integers(0, 3, 8).astype(np.int32),
        "example_weights": np.ones(8, np.float32),
    }
    batch["positions"] = np.where(batch["segment_ids"], np.arange(16), 0).astype(np.int32)
    return batch


def test_last_k_on_scanned_blocks_trains_only_the_last_layer_slices(pretrained, tmp_path):
    cfg = _config(tmp_path, pretrained, "finetune.trainable=last_k", "optim.lr=1e-2")
    assert cfg.model.scan_layers and cfg.model.num_layers == 2
    tx = finetune_optimizer(cfg)
    objective = gate_frozen(cfg, SequenceClassification())
    mesh = make_mesh(MeshConfig(2, 2, 2))
    with jax.set_mesh(mesh):
        graphdef, _, shardings, init = plan_train_state(
            lambda rngs: build_model(cfg, rngs), tx, mesh, 0
        )
        state = init()
        before = _leaves(state.params)
        step = make_train_step(graphdef, tx, objective, shardings)
        state, metrics = step(state, jax.device_put(_class_batch(), batch_sharding(mesh)))
        state, metrics = step(state, jax.device_put(_class_batch(), batch_sharding(mesh)))
    after = _leaves(state.params)
    assert np.isfinite(float(metrics["loss"]))
    for path, value in before.items():
        if path[:2] == ("backbone", "blocks"):
            np.testing.assert_array_equal(after[path][0], value[0], err_msg=str(path))
            assert not np.array_equal(after[path][1], value[1]), path
        elif path[0] == "head" or path[:2] == ("backbone", "final_norm"):
            assert not np.array_equal(after[path], value), path
        else:
            np.testing.assert_array_equal(after[path], value, err_msg=str(path))
