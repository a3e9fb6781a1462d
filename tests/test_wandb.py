"""Weights & Biases logging (`train.wandb`): the scalars metrics.jsonl gets go to wandb too, a
resumed run continues the same wandb run, and without the package a run refuses to start.
A fake `wandb` module stands in for the real one (never installed in tests)."""

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest

from lm.cli import main
from lm.commands.pretrain import pretrain
from lm.config import ConfigError, check_finetuning, check_pretraining, load_config
from lm.train.metrics import MetricsWriter


class FakeRun:
    def __init__(self, **settings):
        self.settings = settings
        self.logged: list[tuple[int, dict]] = []
        self.finished = False

    def log(self, data: dict, step: int) -> None:
        self.logged.append((step, dict(data)))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A `wandb` module whose `init` records its runs in `.runs`."""
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**settings):
        module.runs.append(FakeRun(**settings))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_metrics_writer_sends_the_jsonl_scalars_to_wandb(tmp_path, fake_wandb):
    config = {"optim": {"lr": 0.001}}
    with MetricsWriter(tmp_path, 10, wandb="team/lm-tests", config=config) as writer:
        writer.write(2, {"loss": 5.0, "grad_norm": 1.5})
        writer.write(2, {"loss": 4.8}, prefix="eval")
    [run] = fake_wandb.runs
    assert run.settings["project"] == "lm-tests" and run.settings["entity"] == "team"
    assert run.settings["config"] == config and run.settings["resume"] == "allow"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [(r.pop("step"), r) for r in records]
    assert run.logged == expected == [(2, {"train/loss": 5.0, "train/grad_norm": 1.5}),
                                      (2, {"eval/loss": 4.8})]  # fmt: skip
    assert run.finished
    # A resumed run (a new writer on the same run dir) continues the same wandb run.
    with MetricsWriter(tmp_path, 10, wandb="lm-tests") as writer:
        writer.write(3, {"loss": 4.5})
    assert fake_wandb.runs[1].settings["id"] == run.settings["id"]
    assert fake_wandb.runs[1].settings["entity"] is None


def test_no_wandb_project_opens_no_wandb_run(tmp_path, fake_wandb):
    with MetricsWriter(tmp_path, 10) as writer:
        writer.write(1, {"loss": 5.0})
    assert fake_wandb.runs == []


def test_pretrain_logs_every_metrics_line_to_wandb(tiny_text_config, fake_wandb):
    train = dataclasses.replace(tiny_text_config.train, wandb="lm-tests")
    pretrain(dataclasses.replace(tiny_text_config, train=train))
    [run] = fake_wandb.runs
    lines = (Path(train.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert run.logged == [(r.pop("step"), r) for r in map(json.loads, lines)]
    assert {"train/loss", "eval/loss"} <= {k for _, logged in run.logged for k in logged}
    assert run.settings["config"]["train"]["wandb"] == "lm-tests" and run.finished


def test_train_wandb_without_the_package_refuses_to_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    cfg = load_config(None, ["train.wandb=lm-tests", "finetune.task=classification"])
    for check in (check_pretraining, check_finetuning):
        with pytest.raises(ConfigError, match="train.wandb=lm-tests needs the wandb package"):
            check(cfg)
    run_dir = f"train.run_dir={tmp_path / 'run'}"
    assert main(["pretrain", "train.wandb=lm-tests", run_dir]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install wandb" in err
