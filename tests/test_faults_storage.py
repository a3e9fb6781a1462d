"""Storage faults: corrupt checkpoints fall back to the newest good one, failed saves stop the
run with the older checkpoints kept, and one run at a time writes a run directory."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_model

from lm.config import CheckpointConfig, MeshConfig, OptimConfig
from lm.model import Transformer
from lm.runtime.mesh import make_mesh
from lm.train import run_lock
from lm.train.checkpoint import Checkpointer, CheckpointSaveError, NoUsableCheckpoint
from lm.train.optim import make_optimizer
from lm.train.run_lock import RunDirError, claim_run_dir
from lm.train.state import plan_train_state

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    """(abstract state, shardings, state) of a tiny model on one device."""
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(), 10)
    with jax.set_mesh(mesh):
        _, abstract, shardings, init = plan_train_state(
            lambda rngs: Transformer(tiny_model(), rngs=rngs), tx, mesh, 0
        )
        state = init()
    return abstract, shardings, state


def _save(directory: Path, state, steps, **options) -> Checkpointer:
    checkpointer = Checkpointer(directory, CheckpointConfig(keep=5, **options))
    for step in steps:
        checkpointer.save(step, jax.tree.map(lambda x, s=step: x + s, state), {"step": step})
    checkpointer.wait()
    return checkpointer


def _largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    os.truncate(_largest_data_file(step_dir), 100)


def _empty_file(step_dir: Path) -> None:
    os.truncate(_largest_data_file(step_dir), 0)


def _delete_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def _delete_manifests(step_dir: Path) -> None:
    for manifest in (step_dir / "state").rglob("manifest.ocdbt"):
        manifest.unlink()


def _delete_state(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "state")


def _empty_step_dir(step_dir: Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


CORRUPTIONS = [
    _truncate,
    _empty_file,
    _delete_metadata,
    _delete_manifests,
    _delete_state,
    _empty_step_dir,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(
    tmp_path, tiny, corrupt
):
    abstract, shardings, state = tiny
    _save(tmp_path, state, [1, 2, 3]).close()
    corrupt(tmp_path / "3")
    said = []
    checkpointer = Checkpointer(tmp_path, CheckpointConfig())
    restored, meta, step = checkpointer.restore_newest(abstract, shardings, said.append)
    assert (step, meta) == (2, {"step": 2})
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(want) + 2, np.asarray(got))
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("3.corrupt-")]
    assert len(aside) == 1 and not (tmp_path / "3").exists()
    assert len(said) == 1 and said[0].startswith("checkpoint 3 ") and aside[0] in said[0]
    # Orbax no longer lists it: the next run resumes from step 2 without a word.
    again = Checkpointer(tmp_path, CheckpointConfig())
    assert again.latest_step() == 2


def test_no_good_checkpoint_is_one_usage_error(tmp_path, tiny):
    abstract, shardings, state = tiny
    _save(tmp_path, state, [1, 2]).close()
    _delete_metadata(tmp_path / "1")
    _empty_step_dir(tmp_path / "2")
    said = []
    with pytest.raises(NoUsableCheckpoint, match="Every checkpoint in .* is corrupt and was moved"):
        Checkpointer(tmp_path, CheckpointConfig()).restore_newest(abstract, shardings, said.append)
    assert len(said) == 2 and sorted(p.name.split(".")[0] for p in tmp_path.iterdir()) == [
        "1",
        "2",
    ]
    assert isinstance(NoUsableCheckpoint("x"), ValueError)  # the CLI's exit 2


def test_checkpoints_of_another_config_are_not_moved_aside(tmp_path, tiny):
    """A restore that fails on every checkpoint blames the config, not the files."""
    _, _, state = tiny
    _save(tmp_path, state, [1, 2]).close()
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        _, wider, shardings, _ = plan_train_state(
            lambda rngs: Transformer(tiny_model(d_ff=96), rngs=rngs),
            make_optimizer(OptimConfig(), 10),
            mesh,
            0,
        )
    with pytest.raises(NoUsableCheckpoint, match="Checkpoint 2 .* does not restore .* config"):
        Checkpointer(tmp_path, CheckpointConfig()).restore_newest(wider, shardings, print)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_a_failed_save_raises_naming_step_directory_reason_and_the_kept_checkpoints(
    tmp_path, tiny, monkeypatch
):
    _, _, state = tiny
    checkpointer = _save(tmp_path, state, [1, 2], async_save=False)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(CheckpointSaveError) as caught:
        checkpointer.save(3, state, {"step": 3})
    message = str(caught.value)
    assert f"step 3 in {tmp_path}" in message and "No space left on device" in message
    assert "older checkpoints are kept (newest: step 2)" in message
    assert checkpointer.latest_step() == 2 and "\n" not in message


@contextmanager
def _small_tmpfs(path: Path, size: str, *flags: str):
    """A real tmpfs of `size` at `path` (we run as root in CI); skips where mounts are denied."""
    path.mkdir()
    options = ",".join([f"size={size}", *flags])
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_disk_full_on_a_real_tmpfs_stops_at_the_failed_save(tmp_path, tiny, async_save):
    _, _, state = tiny
    with _small_tmpfs(tmp_path / "disk", "400k") as disk:  # room for two checkpoints
        checkpointer = _save(disk / "ckpt", state, [1, 2], async_save=async_save)
        with pytest.raises(CheckpointSaveError) as caught:
            checkpointer.save(3, state, {"step": 3})
            # An async save fails in the background: `check` reports it without blocking.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert checkpointer.latest_step() == 2  # never the step being written
                checkpointer.check()
                time.sleep(0.05)
        message = str(caught.value)
        assert "step 3" in message and "No space left on device" in message
        assert "older checkpoints are kept (newest: step 2)" in message
        assert checkpointer.latest_step() == 2
        assert sorted(p.name for p in (disk / "ckpt").iterdir() if p.name.isdigit()) == ["1", "2"]


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding `run_dir`'s lock until killed; returns once it holds it."""
    code = (
        "import sys, time\n"
        "from lm.train.run_lock import claim_run_dir\n"
        "with claim_run_dir(sys.argv[1], print):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, cwd=ROOT, env=env
    )
    assert holder.stdout.readline().strip() == b"held"
    return holder


def test_a_second_run_on_a_run_dir_is_refused_naming_the_owner(tmp_path):
    holder = _hold_lock(tmp_path / "run")
    try:
        busy = rf"in use by pid {holder.pid} on .*, started "
        with pytest.raises(RunDirError, match=busy), claim_run_dir(tmp_path / "run", print):
            pass
    finally:
        holder.kill()
        holder.wait()
    said = []  # kill -9 leaves the owner's JSON; the kernel released its lock
    with claim_run_dir(tmp_path / "run", said.append):
        owner = json.loads((tmp_path / "run" / ".lock").read_text())
        assert owner["pid"] == os.getpid()
    assert said == [
        f"taking over the lock of {tmp_path / 'run'} from pid {holder.pid} "
        + said[0].split(f"pid {holder.pid} ", 1)[1]
    ]
    assert "which is gone" in said[0]
    with claim_run_dir(tmp_path / "run", said.append):  # released cleanly: nothing to say
        pass
    assert len(said) == 1


def _dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


@pytest.mark.parametrize("local", [True, False], ids=["flock", "object"])
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch, local):
    if not local:  # the gs:// variant, exercised on a local path
        monkeypatch.setattr(run_lock, "_is_local", lambda _: False)
    (tmp_path / ".lock").write_text(
        json.dumps({"host": os.uname().nodename, "pid": _dead_pid(), "started": "earlier"})
    )
    said = []
    with claim_run_dir(tmp_path, said.append):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert len(said) == 1 and "which is gone" in said[0]


def test_an_object_lock_of_a_live_process_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "_is_local", lambda _: False)
    with (
        claim_run_dir(tmp_path, print),
        pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"),
        claim_run_dir(tmp_path, print),
    ):
        pass
    assert not (tmp_path / ".lock").exists()


def test_a_file_where_the_run_dir_should_be_is_one_sentence(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with (
        pytest.raises(RunDirError, match="is a file; pass a directory path as train.run_dir"),
        claim_run_dir(tmp_path / "run", print),
    ):
        pass
    with (
        pytest.raises(RunDirError, match="Cannot create run directory .*Not a directory"),
        claim_run_dir(tmp_path / "run" / "inner", print),
    ):
        pass


def test_an_unwritable_run_dir_is_one_sentence(tmp_path):
    with _small_tmpfs(tmp_path / "ro", "64k", "ro") as readonly:
        with (
            pytest.raises(RunDirError, match="Read-only file system"),
            claim_run_dir(readonly / "run", print),
        ):
            pass
        with (
            pytest.raises(RunDirError, match="Cannot write in run directory .*Read-only"),
            claim_run_dir(readonly, print),
        ):
            pass
