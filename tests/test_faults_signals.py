"""Real signals sent to real `lm pretrain` processes: every stop resumes bit-identically.

SIGTERM and Ctrl-C at random steps must checkpoint the step reached and exit 0 / 130; kill -9
at random moments (also while an async save is being written) must lose nothing but the steps
after the newest complete checkpoint. Every interrupted run is then resumed to the end, and
its per-step losses in metrics.jsonl must equal those of one uninterrupted run, bit for bit,
with one record per step. A two-process run told SIGTERM on one process stops on both at the
same step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import subprocess_env, subprocess_run_config, write_tiny_corpus

from lm.data.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS = 36
TIMEOUT_S = 180
STOPPED = re.compile(r"stopped by (SIGTERM|SIGINT) after step (\d+); checkpoint saved in (\S+)/")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny corpus, its tokenizer and a 36-step config logging every step."""
    root = tmp_path_factory.mktemp("faults")
    corpus = write_tiny_corpus(root)
    train_tokenizer([p.read_text() for p in sorted(corpus.iterdir())], root / "tok.model", 300)
    config = subprocess_run_config(
        corpus, root / "tfds", root / "tok.model", dict(data=-1), dict(steps=STEPS, eval_every=1000)
    )
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


def _start(root: Path, run_dir: Path, *args: str, devices: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lm", "pretrain", "--config", str(root / "tiny.yaml")]
    return subprocess.Popen(
        [*cmd, f"train.run_dir={run_dir}", *args],
        env=subprocess_env(JAX_NUM_CPU_DEVICES=str(devices)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run did not finish in {TIMEOUT_S} s:\n{out[-3000:]}")
    return proc.returncode, out


def _run(root: Path, run_dir: Path, *args: str) -> str:
    code, out = _finish(_start(root, run_dir, *args))
    assert code == 0, out[-3000:]
    return out


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            steps.append(json.loads(line)["step"])
    return steps


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not any(s >= step for s in _logged_steps(run_dir)):
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.01)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def _complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(workspace) -> list[tuple[int, float]]:
    """The per-step losses of one uninterrupted run."""
    run_dir = workspace / "reference"
    _run(workspace, run_dir)
    losses = _losses(run_dir)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    return losses


def _resume_and_compare(workspace: Path, run_dir: Path, reference) -> str:
    out = _run(workspace, run_dir)
    assert _losses(run_dir) == reference  # one record per step, losses bit for bit
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_at_a_random_step_checkpoints_it_and_the_run_resumes_bitwise(
    workspace, reference, tmp_path, signum
):
    rng = np.random.default_rng(int(signum))
    for trial, target in enumerate(rng.integers(2, STEPS - 4, size=5)):
        run_dir = tmp_path / f"trial{trial}"
        proc = _start(workspace, run_dir)
        _wait_for_step(proc, run_dir, int(target))
        proc.send_signal(signum)
        code, out = _finish(proc)
        stopped = STOPPED.search(out)
        assert stopped, out[-3000:]
        assert code == (0 if signum == signal.SIGTERM else 130)
        assert "Traceback" not in out
        name, step, directory = stopped.group(1), int(stopped.group(2)), stopped.group(3)
        assert name == signal.Signals(signum).name and step >= target
        assert Path(directory) == run_dir / "checkpoints"
        assert _complete_steps(run_dir)[-1] == step
        assert max(_logged_steps(run_dir)) == step  # the stop step is logged, nothing after it
        resumed = _resume_and_compare(workspace, run_dir, reference)
        assert f"resumed from step {step}" in resumed


def test_kill_9_at_random_moments_loses_nothing_once_resumed(workspace, reference, tmp_path):
    rng = np.random.default_rng(9)
    for trial in range(10):
        run_dir = tmp_path / f"trial{trial}"
        proc = _start(workspace, run_dir, "checkpoint.every=3")
        # Half the kills come right as a checkpoint step is logged, while its async save runs.
        target = int(rng.integers(1, 11)) * 3 if trial % 2 else int(rng.integers(2, STEPS - 1))
        _wait_for_step(proc, run_dir, target)
        time.sleep(float(rng.uniform(0, 0.02)))
        os.killpg(proc.pid, signal.SIGKILL)
        _finish(proc)
        newest = (_complete_steps(run_dir) or [0])[-1]
        resumed = _resume_and_compare(workspace, run_dir, reference)
        assert newest == 0 or f"resumed from step {newest}" in resumed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(workspace, tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    endless = ("train.steps=100000", "checkpoint.every=1000")
    procs = [
        _start(workspace, run_dir, *endless, *flags, "--process-id", str(i), devices=1)
        for i in range(2)
    ]
    try:
        _wait_for_step(procs[0], run_dir, 5)  # process 0 writes metrics.jsonl
        procs[1].send_signal(signal.SIGTERM)
        results = [_finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    stops = []
    for code, out in results:
        stopped = STOPPED.search(out)
        assert code == 0 and stopped, out[-3000:]
        stops.append((stopped.group(1), int(stopped.group(2))))
    assert stops[0] == stops[1] and stops[0][0] == "SIGTERM"
    step = stops[0][1]
    assert step >= 5 and _complete_steps(run_dir) == [step]
    assert max(_logged_steps(run_dir)) == step
