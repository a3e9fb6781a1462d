"""XLA:CPU steps reuse freed host memory instead of page-faulting fresh pages every step."""

import subprocess
import sys

import pytest
from conftest import subprocess_env

from lm.runtime import host_memory

# Runs a jitted step whose 64 MB temporary glibc would map afresh on every call, and prints the
# minor page faults of twenty calls after a warm-up.
_FAULTS = """
import resource, sys
from lm.runtime.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda x, w: (x * 2.0) @ w)  # x * 2.0 is the temporary
x, w = jnp.ones((4096, 4096), jnp.float32), jnp.ones((4096, 8), jnp.float32)
for _ in range(5):
    step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step(x, w).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
    ).stdout
    return int(out)


def test_kept_memory_removes_the_page_faults_of_each_step():
    kept_faults, default_faults = _faults("keep"), _faults("default")
    # 64 MB of fresh 4 KiB pages per call by default: ~330,000 faults over twenty calls. Kept,
    # the heap still grows once or twice while small allocations split its freed blocks
    # (0-33,000 faults seen), then each step reuses it.
    assert default_faults > 20 * 16_384 * 0.9
    assert kept_faults < default_faults / 4


@pytest.mark.parametrize(
    ("platforms", "plugins", "on_cpu"),
    [
        ("cpu", ["libtpu"], True),
        ("cpu,tpu", [], True),
        ("tpu", [], False),
        ("cuda,cpu", [], False),
        ("", [], True),
        ("", ["xla_cuda12"], False),
        ("", ["libtpu"], False),
    ],
)
def test_cpu_is_judged_from_jax_platforms_then_from_installed_plugins(
    monkeypatch, platforms, plugins, on_cpu
):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.setattr(host_memory, "_accelerator_plugins", lambda: plugins)
    assert host_memory.jax_runs_on_cpu() is on_cpu


def test_an_accelerator_host_keeps_the_default_allocator(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert host_memory.keep_freed_memory() is False
