"""The run's TensorBoard events are written without importing torch (seconds at every start)."""

import subprocess
import sys

import pytest

SCRIPT = """
import sys
from lm.train.metrics import MetricsWriter
with MetricsWriter(sys.argv[1], 10) as writer:
    writer.write(1, {"loss": 2.5})
print("torch" in sys.modules)
"""


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    pytest.importorskip("torch")  # only a question where torch is installed
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[-1] == "False"
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
