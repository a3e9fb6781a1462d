"""One writer per run directory: `RUN/.lock` names the process that owns the run.

Local run dirs: the lock is an `flock` on `RUN/.lock` that the kernel releases when its owner
exits, however it exits (`kill -9` included), so a dead owner's lock is taken over at once; the
file's JSON (host, pid, start time) names the owner for the message a second run gets. The
owner empties the file when done, so a file still naming someone with no lock held marks a
crash, said in one line when taken over.

gs:// and other remote run dirs have no locks: the lock is an object that a run writes when
none exists and deletes when done. That guarantee is weaker: two runs starting within the same
moment can both write it, and a run killed without cleanup leaves it behind; a lock naming a
dead process of this host is taken over, others must be deleted by hand.

In a multi-process run process 0 owns the lock; every process learns whether it got it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

LOCK_NAME = ".lock"


class RunDirError(ValueError):
    """A run directory that cannot be used: a file, unwritable, or owned by another run."""


def claim_run_dir(run_dir: str | os.PathLike, say: Callable[[str], None]):
    """Context manager: own `run_dir` (created if missing) until the block ends.

    Raises RunDirError, naming the owner or the problem, when another live run owns it or it
    cannot be written; call it before writing anything into the run directory.
    """
    return _claim(epath.Path(run_dir), say)


@contextlib.contextmanager
def _claim(run_dir: epath.Path, say: Callable[[str], None]) -> Iterator[None]:
    lock = None
    error: RunDirError | None = None
    if jax.process_index() == 0:
        try:
            lock = _LocalLock(run_dir, say) if _is_local(run_dir) else _ObjectLock(run_dir, say)
        except RunDirError as caught:
            error = caught
    if jax.process_count() > 1:
        # The others must not train without the lock, nor wait forever for a process 0 that
        # stops here.
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(failed) and error is None:
            error = RunDirError(f"Process 0 could not claim {run_dir}; see its message.")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


def _read_owner(text: str) -> dict | None:
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return None
    return owner if isinstance(owner, dict) else None


def _make_dir(run_dir: epath.Path) -> None:
    """Create `run_dir`, or a RunDirError naming why it cannot be a run directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(
            f"Run directory {run_dir} is a file; pass a directory path as train.run_dir."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(
            f"Cannot create run directory {run_dir} ({error.strerror or error}); choose a "
            "writable train.run_dir."
        ) from error


def _alive_here(owner: dict) -> bool:
    """Whether `owner` may still run: True unless it is a process of this host that is gone."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class _LocalLock:
    """An flock on RUN/.lock, held until `release`."""

    def __init__(self, run_dir: epath.Path, say: Callable[[str], None]):
        _make_dir(run_dir)
        path = os.fspath(run_dir / LOCK_NAME)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(
                f"Cannot write in run directory {run_dir} ({error.strerror}); choose a "
                "writable train.run_dir or fix its permissions."
            ) from error
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(os.pread(self.fd, 4096, 0).decode(errors="replace"))
            os.close(self.fd)
            who = _describe(owner) if owner else "another process"
            raise RunDirError(
                f"Run directory {run_dir} is in use by {who}; wait for that run to end or "
                "choose another train.run_dir."
            ) from None
        previous = _read_owner(os.pread(self.fd, 4096, 0).decode(errors="replace"))
        if previous:
            say(f"taking over the lock of {run_dir} from {_describe(previous)}, which is gone")
        data = json.dumps(_owner()).encode()
        os.ftruncate(self.fd, 0)
        try:
            os.pwrite(self.fd, data, 0)
            os.fsync(self.fd)
        except OSError as error:
            os.close(self.fd)
            raise RunDirError(
                f"Cannot write in run directory {run_dir} ({error.strerror}); free space or "
                "choose another train.run_dir."
            ) from error

    def release(self) -> None:
        # Emptied, not deleted: deleting would let a waiting opener lock the orphaned file.
        os.ftruncate(self.fd, 0)
        os.close(self.fd)


class _ObjectLock:
    """RUN/.lock as an object (gs:// and other stores without locks): best effort."""

    def __init__(self, run_dir: epath.Path, say: Callable[[str], None]):
        _make_dir(run_dir)
        self.path = run_dir / LOCK_NAME
        if self.path.exists():
            owner = _read_owner(self.path.read_text()) or {}
            if _alive_here(owner):
                raise RunDirError(
                    f"Run directory {run_dir} is in use by {_describe(owner)}; wait for that "
                    f"run to end, or delete {self.path} if it is gone."
                )
            say(f"taking over the lock of {run_dir} from {_describe(owner)}, which is gone")
        try:
            self.path.write_text(json.dumps(_owner()))
        except OSError as error:
            raise RunDirError(
                f"Cannot write in run directory {run_dir} ({error}); choose a writable "
                "train.run_dir."
            ) from error

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
