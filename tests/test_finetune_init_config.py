"""`finetune.init_from` brings the checkpoint's architecture into the fine-tune config."""

import dataclasses

import pytest
import yaml
from conftest import tiny_model

from lm.config import Config, ConfigError, DataConfig, to_dict
from lm.train.init_from import finetune_config

FINETUNE_YAML = """
data: {seq_len: 16, batch_size: 8}
train: {run_dir: RUN}
finetune: {task: classification, dataset: records.jsonl, labels: "a,b", init_from: SOURCE}
"""


@pytest.fixture
def source(tmp_path):
    """(a run dir whose config.yaml holds a non-default architecture, the fine-tune YAML)."""
    model = tiny_model(norm="layernorm", bias=True, causal=False, scan_layers=False)
    run = tmp_path / "source"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump(to_dict(Config(model=model, data=DataConfig(seq_len=16))))
    )
    config = tmp_path / "finetune.yaml"
    text = FINETUNE_YAML.replace("SOURCE", str(run)).replace("RUN", str(tmp_path / "ft"))
    config.write_text(text)
    return model, config


def test_model_section_comes_from_the_checkpoint(source):
    model, config = source
    assert finetune_config(config).model == model


def test_runtime_model_keys_may_differ_from_the_checkpoint(source):
    model, config = source
    cfg = finetune_config(config, ["model.dropout=0.1", "model.remat=full", "model.dtype=bfloat16"])
    assert cfg.model == dataclasses.replace(model, dropout=0.1, remat="full", dtype="bfloat16")


@pytest.mark.parametrize(
    ("override", "ours", "theirs"),
    [("model.d_model=64", "64", "32"), ("model.scan_layers=true", "True", "False")],
)
def test_explicit_architecture_keys_must_match_the_checkpoint(source, override, ours, theirs):
    _, config = source
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}={ours} in this config but {theirs} in the"):
        finetune_config(config, [override])
    same = finetune_config(config, [f"{key}={theirs.lower()}"])  # restating it is fine
    assert str(getattr(same.model, key.split(".")[1])) == theirs


def test_without_init_from_the_config_is_load_configs(tmp_path):
    overrides = ["finetune.task=classification", "finetune.dataset=r.jsonl", "finetune.labels=a,b"]
    cfg = finetune_config(None, [*overrides, "model.d_model=64"])
    assert cfg.model.d_model == 64 and cfg.model.num_layers == Config().model.num_layers


def test_config_is_checked_against_the_checkpoints_model_not_the_defaults(tmp_path):
    model = tiny_model(max_seq_len=1024)  # the default model allows only 256 positions
    run = tmp_path / "source"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(Config(model=model))))
    config = tmp_path / "finetune.yaml"
    config.write_text(FINETUNE_YAML.replace("SOURCE", str(run)).replace("RUN", str(tmp_path)))
    cfg = finetune_config(config, ["data.seq_len=512"])
    assert cfg.data.seq_len == 512 and cfg.model.max_seq_len == 1024
