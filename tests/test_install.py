"""`make demo` installs the runtime alone; the dev extra (torch, transformers) only for tests."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _dry_run(target: str, tmp_path: pathlib.Path) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"  # absent: make lists every install step
    result = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_demo_installs_no_torch_and_no_dev_extra(tmp_path):
    commands = _dry_run("demo", tmp_path)
    assert "pip install -q -e ." in commands and "lm pretrain" in commands
    assert "[dev]" not in commands and "torch" not in commands


def test_make_test_adds_the_dev_extra(tmp_path):
    commands = _dry_run("test", tmp_path)
    assert "pip install -q -e '.[dev]'" in commands and "pytest" in commands
