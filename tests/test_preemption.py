"""Stopping on SIGTERM and Ctrl-C: the signal handlers, and the loop saving the step it stops at."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from lm.config import CheckpointConfig
from lm.train.checkpoint import Checkpointer
from lm.train.loop import LoopSettings, run_loop
from lm.train.metrics import MetricsWriter
from lm.train.preemption import Preempted, StopSignals


def settings(steps: int, checkpoint_every: int = 100, **overrides) -> LoopSettings:
    base = dict(
        total_steps=steps,
        stop_at=steps,
        log_every=1,
        eval_every=100,
        checkpoint_every=checkpoint_every,
        tokens_per_step=1,
        flops_per_step=1.0,
        peak_flops=1.0,
    )
    return LoopSettings(**{**base, **overrides})


def counting_step(state, batch):
    return {"w": state["w"] + 1}, {"loss": jnp.float32(1.0 / (batch + 1))}


def test_first_signal_is_recorded_and_previous_handlers_come_back():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals() as signals:
            assert signals.requested(1) is None
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
            assert signals.requested(2) == signal.SIGTERM
        assert seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # the handler from before is back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ignored_signals_stay_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.requested(1) is None
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_second_ctrl_c_exits_at_once_with_status_130():
    script = (
        "import os, signal, time\n"
        "from lm.train.preemption import StopSignals\n"
        "with StopSignals() as s:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('first', s.requested(1) == signal.SIGINT, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 130
    assert result.stdout == "first True\n"
    assert "interrupted again" in result.stderr and "Traceback" not in result.stderr


def test_with_a_sync_point_sigterm_is_left_to_jax_and_ctrl_c_is_passed_on_as_sigterm():
    forwarded = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: forwarded.append(signum))
    agreed_step = 7
    try:
        with StopSignals(sync_point=lambda step: step == agreed_step) as signals:
            assert signal.getsignal(signal.SIGTERM) is not signals._handle
            os.kill(os.getpid(), signal.SIGINT)
            assert forwarded == [signal.SIGTERM]  # to JAX's notifier, which tells every process
            # This process goes on to the step all processes agreed on, then stops for Ctrl-C.
            assert [signals.requested(step) for step in (5, 6)] == [None, None]
            assert signals.requested(agreed_step) == signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sync_point_alone_stops_a_process_that_got_no_signal():
    with StopSignals(sync_point=lambda step: step == 3) as signals:
        assert [signals.requested(step) for step in (1, 2, 3)] == [None, None, signal.SIGTERM]


def test_loop_stops_after_the_step_a_signal_arrives_in_and_checkpoints_it(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every=5, async_save=True))
    writer = MetricsWriter(tmp_path, 10, stream=io.StringIO())

    def step_then_signal(state, batch):
        if batch == 6:  # while step 7 runs
            os.kill(os.getpid(), signal.SIGINT)
        return counting_step(state, batch)

    with pytest.raises(Preempted) as stop:
        run_loop(
            {"w": jnp.zeros(())},
            step_then_signal,
            lambda step: step,
            settings(10, checkpoint_every=5, log_every=4),
            writer,
            checkpointer,
            lambda step: {"step": step},
        )
    assert (stop.value.step, stop.value.exit_code) == (7, 130)
    assert str(checkpointer.directory / "7") in str(stop.value)
    assert checkpointer.latest_step() == 7
    one_device = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    state, meta = checkpointer.restore(7, {"w": jnp.zeros(())}, one_device)
    assert float(state["w"]) == 7 and meta == {"step": 7}
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 7]  # the partial window is logged at the stop
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resuming_drops_metrics_logged_past_the_restored_step(tmp_path):
    lines = [json.dumps({"step": s, "train/loss": 9.0}) for s in range(1, 9)]
    lines.insert(4, json.dumps({"step": 4, "eval/loss": 8.0}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "tr')  # torn write
    checkpointer = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every=100, async_save=False))
    writer = MetricsWriter(tmp_path, 10, stream=io.StringIO())
    run_loop(
        {"w": jnp.zeros(())},
        counting_step,
        lambda step: step,
        settings(10),
        writer,
        checkpointer,
        lambda step: {},
        start_step=4,
    )
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == list(range(1, 11))
    assert [r["train/loss"] for r in records if "train/loss" in r][4:] == [
        pytest.approx(1.0 / (b + 1)) for b in range(4, 10)
    ]
    assert [r["step"] for r in records if "eval/loss" in r] == [4]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    # TensorBoard's purge marker: readers drop events of steps >= 5 written before it.
    purges = [e.step for e in _tensorboard_events(tmp_path) if e.HasField("session_log")]
    assert purges == [5]


def _tensorboard_events(run_dir) -> list[event_pb2.Event]:
    """The events of run_dir/tensorboard (TFRecord: length, its CRC, the data, its CRC)."""
    events = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + length]))
            i += 12 + length + 4
    return events


class _DeviceScalar:
    """A metric computed on a fake device: ready when its future is done, like a jax.Array."""

    def __init__(self, future):
        self.future = future

    def is_ready(self) -> bool:
        return self.future.done()

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.future.result(), dtype)


class _SlowStream(io.StringIO):
    """Progress output that takes the host `delay` seconds per write (a slow terminal)."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def write(self, text: str) -> int:
        time.sleep(self.delay)
        return super().write(text)


def test_tokens_per_second_never_exceeds_what_the_device_can_do_at_log_every_1(tmp_path):
    step_s = 0.05  # the fake device runs one step at a time, each taking this long
    device = ThreadPoolExecutor(max_workers=1)
    lock = threading.Lock()

    def run_on_device(value: float) -> float:
        with lock:
            time.sleep(step_s)
        return value

    def async_step(state, batch):
        return state, {"loss": _DeviceScalar(device.submit(run_on_device, 1.0))}

    # The host spends most of a step writing logs while the device runs the next step: timing
    # a step from the end of the previous report would count only what is left of it.
    writer = MetricsWriter(tmp_path, 12, stream=_SlowStream(0.8 * step_s / 2))
    checkpointer = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every=100, async_save=False))
    loop_settings = settings(12, tokens_per_step=100, flops_per_step=step_s, peak_flops=1.0)
    try:
        state = {"w": jnp.zeros(())}
        run_loop(
            state, async_step, lambda step: step, loop_settings, writer, checkpointer, lambda s: {}
        )
    finally:
        device.shutdown()
        writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    # A step cannot be shorter than step_s: at most 100 / step_s tokens/s and MFU 100%, up to
    # the host's clock and thread wake-up jitter.
    assert max(r["train/tokens_per_s"] for r in records) <= 100 / step_s * 1.1
    assert max(r["train/mfu"] for r in records) <= 1.1
    assert np.median([r["train/mfu"] for r in records]) > 0.5  # and not far below either
