"""`data.tokenizer=PATH` names the tokenizer of a run saved without one, for `lm generate` and
`lm evaluate` alike (each said so in its error, and evaluate used to ignore it)."""

import json
import shutil
from pathlib import Path

import yaml

from lm.cli import main
from lm.commands.pretrain import pretrain


def test_generate_and_evaluate_use_a_data_tokenizer_override(tiny_text_config, tmp_path, capsys):
    pretrain(tiny_text_config)
    capsys.readouterr()
    run = Path(tiny_text_config.train.run_dir)
    generate = ["generate", "--run", str(run), "--prompt", "the king", "--json"]
    assert main(generate + ["--max-new-tokens", "4"]) == 0
    expected = json.loads(capsys.readouterr().out)
    # The same run without its tokenizer, whose config names none.
    bare, tokenizer = tmp_path / "bare", tmp_path / "elsewhere.model"
    shutil.copytree(run, bare)
    (bare / "tokenizer.model").rename(tokenizer)
    config = yaml.safe_load((bare / "config.yaml").read_text())
    assert config["data"]["tokenizer"] == ""
    generate[2] = str(bare)
    evaluate = ["evaluate", "--run", str(bare), "--max-batches", "1"]
    for args in (generate + ["--max-new-tokens", "4"], evaluate):
        assert main(args) == 2
        assert "data.tokenizer=PATH" in capsys.readouterr().err
    override = f"data.tokenizer={tokenizer}"
    assert main([*generate, "--max-new-tokens", "4", override]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == expected["tokens"]
    assert main([*evaluate, "--output", str(tmp_path / "report.json"), override]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["metrics"]["tokens"] > 0
