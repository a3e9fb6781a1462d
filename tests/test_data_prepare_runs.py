"""Prepared data through `lm pretrain` and `lm evaluate`: TFDS builders, mixtures, processes."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
import yaml
from conftest import TINY_RUN_MODEL

from lm.cli import main
from lm.commands.data import prepare_data
from lm.commands.evaluate import evaluate_run, evaluation_config
from lm.commands.pretrain import pretrain
from lm.config import Config, load_config, to_dict
from lm.data.pipeline import load_pretrain_data
from lm.data.prepared import load_prepared_data

# lm1b holds sentences; c4 holds web pages (mocked both as short random text).
BUILDERS = ["lm1b", "c4/en"]


def _config(tmp_path, source: str, prepared: str, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.source={source}",
            f"data.prepared={prepared}",
            f"data.data_dir={tmp_path / 'tfds'}",
            "data.seq_len=16",
            "data.batch_size=8",
            *TINY_RUN_MODEL,
            f"train.run_dir={tmp_path / 'run'}",
            "train.steps=3",
            "train.eval_every=3",
            "train.eval_batches=1",
            "train.sample_tokens=0",
            "checkpoint.every=3",
            "mesh.data=-1",
            *extra,
        ],
    )


@pytest.mark.parametrize("builder", BUILDERS)
def test_mocked_tfds_builder_prepares_trains_and_evaluates(tmp_path, builder):
    cfg = _config(tmp_path, f"tfds:{builder}", str(tmp_path / "prepared"))
    with tfds.testing.mock_data(num_examples=60):
        manifest = prepare_data(cfg, workers=1)  # mocks live in this process only
    assert manifest["splits"]["train"]["documents"] == 60
    assert manifest["source"]["source"] == f"tfds:{builder}"
    final = pretrain(cfg)  # no TFDS here: the run reads the shards
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (
        tmp_path / "prepared" / "tokenizer.model"
    ).read_bytes()
    report = evaluate_run(tmp_path / "run", evaluation_config(tmp_path / "run"))
    assert report["metrics"]["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert np.isfinite(report["metrics"]["bits_per_byte"]) and report["rows"] > 0


def _two_prepared(tmp_path) -> tuple[str, str]:
    """lm1b and c4 mocks prepared with one tokenizer (the first trains it, the second reuses it)."""
    lm1b, c4 = str(tmp_path / "lm1b"), str(tmp_path / "c4")
    with tfds.testing.mock_data(num_examples=60):
        prepare_data(_config(tmp_path, "tfds:lm1b", lm1b), workers=1)
        tokenizer = f"data.tokenizer={tmp_path / 'lm1b' / 'tokenizer.model'}"
        prepare_data(_config(tmp_path, "tfds:c4/en", c4, tokenizer), workers=1)
    return lm1b, c4


@pytest.mark.parametrize("mixed", [False, True], ids=["prepared", "mixture"])
def test_batches_are_the_same_for_1_2_4_processes_and_after_a_restart(tmp_path, mixed):
    lm1b, c4 = _two_prepared(tmp_path)
    extra = [f"data.mixture={lm1b}=0.75,{c4}=0.25"] if mixed else []
    cfg = _config(tmp_path, "tfds:lm1b", lm1b, *extra)
    first = load_prepared_data(cfg.data, tmp_path / "run", 300).train
    restarted = load_prepared_data(cfg.data, tmp_path / "run", 300).train  # as a resume does
    for step in (0, 1, 7, 30):
        whole = first.local_batch(step, 0, 1)
        np.testing.assert_array_equal(restarted.local_batch(step, 0, 1)["inputs"], whole["inputs"])
        for processes in (2, 4):
            parts = [restarted.local_batch(step, p, processes) for p in range(processes)]
            for key in whole:
                np.testing.assert_array_equal(
                    np.concatenate([p[key] for p in parts]), whole[key], err_msg=key
                )


def test_mixture_run_logs_each_sources_share_and_tokens(tmp_path, capsys):
    lm1b, c4 = _two_prepared(tmp_path)
    cfg = _config(tmp_path, "tfds:lm1b", "", f"data.mixture={lm1b}=0.75,{c4}=0.25")
    pretrain(cfg)
    out = capsys.readouterr().out
    assert f"mixture: {lm1b}: 6/8 rows a step (75.0%), 288 tokens over 3 steps" in out
    assert f"mixture: {c4}: 2/8 rows a step (25.0%), 96 tokens over 3 steps" in out


def test_cli_refuses_a_tokenizer_the_data_was_not_prepared_with(tmp_path, capsys):
    lm1b, _ = _two_prepared(tmp_path)
    other = tmp_path / "other"
    with tfds.testing.mock_data(num_examples=60):
        # Another tokenizer: trained afresh on c4's mock text into its own directory.
        prepare_data(_config(tmp_path, "tfds:c4/en", str(other)), workers=1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(_config(tmp_path, "tfds:lm1b", lm1b))))
    code = main(["pretrain", "--config", str(config), f"data.tokenizer={other}/tokenizer.model"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "was tokenized with a different tokenizer" in err and "\n" not in err


def test_manifest_json_is_readable_by_hand(tmp_path):
    lm1b, _ = _two_prepared(tmp_path)
    manifest = json.loads((tmp_path / "lm1b" / "manifest.json").read_text())
    assert set(manifest["splits"]["validation"]) >= {"documents", "tokens", "bytes", "shards"}


def test_cli_prepare_without_a_directory_says_which_key_to_set(capsys):
    assert main(["data", "prepare", "data.source=shakespeare"]) == 2
    err = capsys.readouterr().err
    assert "data.prepared, which is empty; set data.prepared=DIR" in err


def test_cli_prepares_local_text_then_reuses_it(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a small corpus of words\n" for i in range(200)))
    args = [
        "data",
        "prepare",
        "--workers=1",
        f"data.source={corpus}",
        "data.text_unit=line",
        f"data.prepared={tmp_path / 'prepared'}",
        "model.vocab_size=300",
    ]
    assert main(args) == 0
    assert "train: " in capsys.readouterr().out
    assert main(args) == 0
    assert "already holds" in capsys.readouterr().out


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


@pytest.mark.slow
def test_resumed_run_on_a_mixture_repeats_the_straight_run_bitwise(tmp_path):
    lm1b, c4 = _two_prepared(tmp_path)
    mixture = f"data.mixture={lm1b}=0.75,{c4}=0.25"
    steps = ("train.steps=6", "train.log_every=1", "checkpoint.every=3", "train.eval_every=6")
    straight = _config(tmp_path / "a", "tfds:lm1b", "", mixture, *steps)
    pretrain(straight)
    resumed = _config(tmp_path / "b", "tfds:lm1b", "", mixture, *steps, "train.stop_at=3")
    pretrain(resumed)  # "preempted" after step 3
    pretrain(_config(tmp_path / "b", "tfds:lm1b", "", mixture, *steps))
    a, b = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]


@pytest.mark.slow
def test_the_demo_on_prepared_data_sees_the_in_memory_demos_batches(tmp_path):
    # Same tokenizer (trained on the same train plays), same rows: the same bits-per-byte.
    cfg = load_config(
        "configs/shakespeare.yaml",
        [f"data.data_dir={tmp_path / 'tfds'}", f"data.prepared={tmp_path / 'prepared'}"],
    )
    prepare_data(cfg, workers=2)
    memory = load_pretrain_data(cfg.data, tmp_path / "memory_run", cfg.model.vocab_size)
    prepared = load_prepared_data(cfg.data, tmp_path / "prepared_run", cfg.model.vocab_size)
    # The files differ (each names its temporary training directory); the pieces do not.
    assert prepared.tokenizer.pieces() == memory.tokenizer.pieces()
    for stats in ("train_stats", "validation_stats"):
        got, expected = (dataclasses.astuple(getattr(d, stats)) for d in (prepared, memory))
        assert got == pytest.approx(expected, rel=1e-9)
    for step in (0, 100, 739):
        a, b = memory.train.local_batch(step, 0, 1), prepared.train.local_batch(step, 0, 1)
        for key in a:
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    rows = np.arange(len(memory.validation))
    for key, values in memory.validation.take(rows).items():
        np.testing.assert_array_equal(prepared.validation.take(rows)[key], values, err_msg=key)
