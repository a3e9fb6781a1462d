"""Stopping training cleanly on SIGTERM (preemption) and Ctrl-C.

While `StopSignals` is active, the first SIGTERM or SIGINT only records a request; the loop
asks `requested(step)` after each step, checkpoints that step and raises `Preempted`, which the
CLI turns into one line and exit status 0 (SIGTERM) or 130 (SIGINT). A second Ctrl-C exits
at once with status 130, abandoning any checkpoint save in flight (Orbax never reads an
unfinished one). The previous handlers come back when the block ends.

In a multi-host run every process must stop at the same step, so the stop step comes from
JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`): the
coordination service's notifier catches SIGTERM on any process, tells the others, and all of
them agree on the step after the furthest one any has reached. That notifier owns SIGTERM (a
C handler Python does not see), so SIGTERM is left to it, and Ctrl-C is passed on to it as a
SIGTERM to this process.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


class Preempted(Exception):
    """Training stopped for a signal after checkpointing `step` in `directory`."""

    def __init__(self, signum: int, step: int, directory: str):
        self.signum, self.step, self.directory = signum, step, directory
        self.exit_code = EXIT_CODES[signum]
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
            f"{directory}/{step}; rerun the same command to resume from it."
        )


def abort() -> None:
    """Exit at once with status 130 (the second Ctrl-C).

    Not an exception: unwinding through Orbax's wait for a save logs its tracebacks, and its
    save threads would then hold up a normal interpreter exit.
    """
    os.write(
        2,
        b"lm: interrupted again; abandoned any checkpoint save in progress. Rerun the same "
        b"command to resume from the newest complete checkpoint.\n",
    )
    os._exit(130)


class StopSignals:
    """Records SIGTERM and SIGINT during a `with` block; `requested(step)` says when to stop.

    `sync_point(step) -> bool` is JAX's preemption sync point in a multi-host run (None
    otherwise); it must then be asked at every step, with consecutive step numbers.
    """

    def __init__(self, sync_point: Callable[[int], bool] | None = None):
        self.sync_point = sync_point
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        ours = (signal.SIGINT,) if self.sync_point else (signal.SIGTERM, signal.SIGINT)
        for signum in ours:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:  # e.g. nohup, or a launcher that handles Ctrl-C
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            abort()
        if self.received is None:
            self.received = signum
            if self.sync_point is not None:
                os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells every process

    def requested(self, step: int) -> int | None:
        """The signal to stop for after `step` (already run), or None to go on."""
        if self.sync_point is None:
            return self.received
        if self.sync_point(step):
            return self.received or signal.SIGTERM
        return None
