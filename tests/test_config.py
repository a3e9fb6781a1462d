"""Config loading: YAML + overrides, and one clear sentence (exit code 2) for each bad value."""

import subprocess
import sys
from pathlib import Path

import pytest

from lm.cli import main
from lm.config import ConfigError, from_dict, load_config, mesh_shape, to_dict, validate

ROOT = Path(__file__).resolve().parent.parent


def test_yaml_and_dotted_overrides_set_typed_values():
    cfg = load_config(ROOT / "configs/shakespeare.yaml", ["optim.lr=3e-4", "train.steps=500"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 500
    assert cfg.model.d_model == 128  # from the YAML file
    assert from_dict(to_dict(cfg)) == cfg


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("**/*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "Unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        (
            ["modle.d_model=8"],
            "Unknown config section 'modle' in 'modle.d_model'; did you mean 'model'?",
        ),
        (["optim.lr=fast"], "optim.lr must be float, got 'fast' (str)"),
        (["optim.lr=-0.1"], "optim.lr must be positive, got -0.1"),
        (["model.num_heads=5"], "model.num_heads=5 does not divide model.d_model=128"),
        (["model.num_kv_heads=3"], "model.num_kv_heads=3 does not divide model.num_heads=4"),
        (["data.seq_len=512"], "data.seq_len=512 is longer than model.max_seq_len=128"),
        (["model.norm=batchnorm"], "model.norm must be one of ['rmsnorm', 'layernorm']"),
        (["train.steps"], "Override 'train.steps' must look like section.key=value."),
    ],
)
def test_bad_values_raise_one_clear_sentence(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "configs/shakespeare.yaml", overrides)
    assert message in str(error.value)


def test_mesh_product_must_match_device_count():
    assert mesh_shape(load_config(None, ["mesh.data=-1", "mesh.tensor=2"]).mesh, 8) == (4, 1, 2)
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor = 2\*2\*1 = 4 but there are 8"):
        validate(load_config(None, ["mesh.data=2", "mesh.fsdp=2"]), device_count=8)
    with pytest.raises(ConfigError, match="3 does not divide 8"):
        mesh_shape(load_config(None, ["mesh.fsdp=3"]).mesh, 8)


def test_loading_a_config_has_no_side_effects(tmp_path):
    cfg = load_config(None, [f"train.run_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()
    assert cfg.train.run_dir == str(tmp_path / "run")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "optim.lr=-1"], "optim.lr must be positive"),
        (["pretrain", "model.num_heads=3"], "does not divide model.d_model"),
        (["pretrain", "mesh.data=3"], "but there are 8 devices"),
        (["pretrain", "--config", "nope.yaml"], "Config file nope.yaml does not exist"),
    ],
)
def test_cli_reports_bad_config_with_exit_code_2(argv, message, capsys, tmp_path):
    assert main([*argv, f"train.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm pretrain: error: ") and message in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no compute spent


def test_console_script_exits_2_on_unknown_key():
    result = subprocess.run(
        [sys.executable, "-m", "lm", "pretrain", "train.stepz=3"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Unknown config key 'train.stepz'; did you mean 'train.steps'?" in result.stderr


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    from lm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 32\n   vocab_size: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line 3, column 14: "):
        load_config(bad)
    assert main(["pretrain", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 3, column 14" in err
