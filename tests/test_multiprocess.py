"""Real multi-process runs on this CPU: `jax.distributed` over gloo, launched by launch/local.sh.

Each run is a fresh `python -m lm pretrain` (or several, joined on a loopback coordinator), so
these tests prove what a user's multi-host run does: same losses as one process, checkpoints
that move between process counts, and a bounded, loud failure when a process dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from conftest import subprocess_env, subprocess_run_config

from lm.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "launch" / "local.sh"
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny corpus, its tokenizer and a 6-step config on mesh (2, 2, 2)."""
    root = tmp_path_factory.mktemp("multiprocess")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "and", "of", "to", "my", "lord", "is", "what", "thou"]
    texts = []
    for i in range(12):
        texts.append("\n".join(" ".join(rng.choice(words, 9)) for _ in range(40)) + "\n")
        (corpus / f"doc{i:02d}.txt").write_text(texts[-1])
    train_tokenizer(texts, root / "tokenizer.model", 300)
    config = subprocess_run_config(
        corpus,
        root / "tfds",
        root / "tokenizer.model",
        dict(data=2, fsdp=2, tensor=2),
        dict(steps=6, eval_every=100),
    )
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


def _env(processes: int, devices: int) -> dict[str, str]:
    # One process sees its devices directly; launched processes get theirs from the launcher.
    devices_var = "JAX_NUM_CPU_DEVICES" if processes == 1 else "LM_LOCAL_DEVICES"
    return subprocess_env(LM_GRACE_S="20", **{devices_var: str(devices)})


def _lm_cmd(
    root: Path, run_dir: Path, *overrides: str, command: str = "pretrain", config: str = "tiny.yaml"
) -> list[str]:
    return [
        sys.executable, "-m", "lm", command, "--config", str(root / config),
        f"train.run_dir={run_dir}", *overrides,
    ]  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """(exit status, output) of `proc`; kills its whole process group on timeout or error."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run did not finish in {timeout} s:\n{out[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(
    root: Path, processes: int, devices: int, run_dir: Path, *overrides: str, **command: str
) -> str:
    """`lm pretrain` (or `command=`, `config=`, see _lm_cmd) on `processes` processes of
    `devices` CPU devices each; returns its output."""
    cmd = _lm_cmd(root, run_dir, *overrides, **command)
    if processes > 1:
        cmd = ["bash", str(LOCAL), str(processes), *cmd]
    proc = subprocess.Popen(
        cmd,
        env=_env(processes, devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    code, out = _finish(proc, TIMEOUT_S)
    assert code == 0, f"{processes}-process run failed ({code}):\n{out[-3000:]}"
    return out


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def final_eval(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "final_eval.json").read_text())


def params_at(run_dir: Path, step: int | None) -> list[np.ndarray]:
    from lm.run_dir import load_run

    return [np.asarray(x) for x in jax.tree.leaves(load_run(run_dir, step=step).params)]


def assert_bitwise_equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    differ = [
        f"leaf {i} {x.shape}: {np.sum(x != y)} values differ, max |diff| {np.max(np.abs(x - y))}"
        for i, (x, y) in enumerate(zip(a, b, strict=True))
        if not np.array_equal(x, y)
    ]
    assert not differ, "; ".join(differ)


# fsdp across the two processes, tensor within each. On this mesh every cross-device sum of the
# step has two terms, and a + b is the same float whichever collective adds it; with more terms
# gloo's ring and XLA's in-process collectives add in different orders, which moves a last bit
# now and then (see the hybrid-mesh test below).
TWO_TERM_MESH = ("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2")


def test_two_processes_match_one_process_and_checkpoints_move_between_them(workspace, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(workspace, 1, 4, one, "train.stop_at=5", *TWO_TERM_MESH)
    run(workspace, 2, 2, two, "train.stop_at=5", *TWO_TERM_MESH)
    # Training is bit-identical: same parameters and same logged losses (the metric sums are
    # gathered and added up locally, never all-reduced, see reduce_sums).
    assert_bitwise_equal(params_at(two, 5), params_at(one, 5))
    assert losses(two) == losses(one) and sorted(losses(one)) == [1, 2, 3, 4, 5]

    # Each resumes the other's step-5 checkpoint, and step 6 comes out the same either way.
    two_then_one = run(workspace, 1, 4, two, *TWO_TERM_MESH)
    one_then_two = run(workspace, 2, 2, one, *TWO_TERM_MESH)
    assert "resumed from step 5" in two_then_one and "resumed from step 5" in one_then_two
    assert_bitwise_equal(params_at(two, 6), params_at(one, 6))
    assert losses(one)[6] == losses(two)[6]
    # The final validation (eval step) of the 2-process run equals the 1-process one exactly.
    assert final_eval(one) == final_eval(two)


@pytest.mark.slow
def test_four_processes_on_a_hybrid_mesh_match_one_process(workspace, tmp_path):
    # Each process is one 'slice' of 2 devices (tensor=2); data and fsdp cross processes (dcn),
    # in a device order that differs from one process's mesh. The batch is split four ways, so
    # some gradients are sums of four terms, which gloo's ring adds in another order than one
    # process does: equal to float32 rounding (bit-identical on most data, not all).
    hybrid = ("mesh.data=1", "mesh.fsdp=1", "mesh.dcn_data=2", "mesh.dcn_fsdp=2")
    one, four = tmp_path / "one", tmp_path / "four"
    run(workspace, 1, 8, one, "train.stop_at=2")
    run(workspace, 4, 2, four, "train.stop_at=2", *hybrid)
    for a, b in zip(params_at(four, 2), params_at(one, 2), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert sorted(losses(one)) == [1, 2]
    assert losses(four) == pytest.approx(losses(one), rel=1e-6)


@pytest.fixture(scope="module")
def finetune_workspace(workspace) -> Path:
    """A 'pretrained' run (random weights, the workspace's tokenizer), 92 labelled JSONL
    records and a 6-step classification fine-tune config on mesh (2, 2, 2)."""
    from flax import nnx

    from lm.config import load_config
    from lm.model import Transformer
    from lm.run_dir import write_params_run

    cfg = load_config(workspace / "tiny.yaml", [])
    with nnx.use_eager_sharding(False):
        params = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(7)))
    write_params_run(workspace / "pretrained", cfg, params)
    (workspace / "pretrained" / "tokenizer.model").write_bytes(
        (workspace / "tokenizer.model").read_bytes()
    )
    rng = np.random.default_rng(1)
    words = ["the", "king", "queen", "and", "of", "to", "my", "lord", "is", "what", "thou"]
    lines = []
    for _ in range(92):  # 23 validation examples: the last evaluation batch is padded
        text = list(rng.choice(words, 6))
        label = ["none", "one", "both"][["king" in text, "queen" in text].count(True)]
        lines.append(json.dumps({"text": " ".join(text), "label": label}) + "\n")
    (workspace / "records.jsonl").write_text("".join(lines))
    config = {
        "data": dict(seq_len=16, batch_size=8, validation_fraction=0.25),
        "finetune": dict(
            task="classification",
            dataset=str(workspace / "records.jsonl"),
            labels="none,one,both",
            init_from=str(workspace / "pretrained"),
        ),
        "mesh": dict(data=2, fsdp=2, tensor=2),
        "optim": dict(lr=1e-2, warmup_steps=0),
        "train": dict(steps=6, log_every=1, eval_every=2),
        "checkpoint": dict(every=3),
    }
    (workspace / "finetune.yaml").write_text(yaml.safe_dump(config))
    return workspace


@pytest.mark.slow
def test_two_process_finetune_matches_one_process_and_writes_each_file_once(
    finetune_workspace, tmp_path
):
    one, two = tmp_path / "one", tmp_path / "two"
    finetune = dict(command="finetune", config="finetune.yaml")
    run(finetune_workspace, 1, 8, one, **finetune)
    run(finetune_workspace, 2, 4, two, **finetune)
    # Each process trains on its half of every global batch. On mesh (2, 2, 2) some gradients
    # are sums of four terms, added in another order by gloo than by one process (see
    # TWO_TERM_MESH): the weights drift by ~1e-7 within 3 steps, so losses, weights and metrics
    # are compared to float32 rounding.
    assert sorted(losses(two)) == sorted(losses(one)) == [1, 2, 3, 4, 5, 6]
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    for a, b in zip(params_at(two, 6), params_at(one, 6), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Validation predictions are gathered from both processes: the same metrics.
    assert final_eval(two) == pytest.approx(final_eval(one), rel=1e-6)
    assert {"validation/accuracy", "validation/macro_f1", "best/step"} <= final_eval(one).keys()
    best = [json.loads((d / "best" / "best.json").read_text()) for d in (one, two)]
    assert best[0] == best[1] and best[0]["step"] in (2, 4, 6)
    for a, b in zip(params_at(two / "best", None), params_at(one / "best", None), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    # Only process 0 logs: each step and each evaluation once, and no file is half-written.
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    one_records = (one / "metrics.jsonl").read_text().splitlines()
    assert len(records) == len(one_records)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps))
    for d in (two, two / "best"):
        assert sorted(p.name for p in d.iterdir() if p.is_file()) == sorted(
            p.name for p in (one / d.relative_to(two)).iterdir() if p.is_file()
        )
    saved = {p.name for p in (two / "checkpoints").iterdir()}
    assert saved == {p.name for p in (one / "checkpoints").iterdir()} and "6" in saved
    assert [p.name for p in (two / "best" / "checkpoints").iterdir()] == [str(best[1]["step"])]


def test_hybrid_mesh_needs_one_process_or_slice_per_dcn_slice():
    from lm.config import ConfigError, MeshConfig, mesh_shape
    from lm.runtime.mesh import make_mesh

    assert mesh_shape(MeshConfig(data=-1, tensor=2, dcn_data=2, dcn_fsdp=2), 16) == (4, 2, 2)
    with pytest.raises(ConfigError, match="asks for 2 slices but the devices come from 1 process"):
        make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2), jax.devices())
    with pytest.raises(ConfigError, match="do not split evenly"):
        mesh_shape(MeshConfig(dcn_data=3), 8)


@pytest.mark.slow
def test_killed_process_stops_the_others_quickly_and_the_run_resumes(workspace, tmp_path):
    run_dir = tmp_path / "run"
    port = _free_port()
    overrides = ("train.steps=100000", "checkpoint.every=3")
    procs = []
    for i in range(2):
        # Started by hand with the explicit flags (launch/local.sh uses the LM_* variables).
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
        procs.append(
            subprocess.Popen(
                [*_lm_cmd(workspace, run_dir, *overrides), *flags, str(i)],
                env=_env(1, 4),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (run_dir / "checkpoints" / "3").is_dir():
            assert time.monotonic() < deadline, "no checkpoint was written"
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.2)
        procs[1].kill()
        killed_at = time.monotonic()
        code, out = _finish(procs[0], timeout=60)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert code != 0
    assert "another task died" in out, out[-3000:]
    assert waited < 45  # heartbeat timeout 5 s, plus slack for a contended machine

    saved = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    resumed = run(workspace, 2, 4, run_dir, *overrides, f"train.stop_at={saved + 1}")
    assert f"resumed from step {saved}" in resumed
    assert saved + 1 in losses(run_dir)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
