"""Host memory for XLA:CPU: freed blocks stay mapped for the next step.

XLA:CPU takes each execution's temporaries from malloc (600 MB for the benchmark's train step),
and glibc serves every block over 32 MB with fresh pages that the kernel faults in and zeroes on
first touch: ~150,000 page faults per step on the benchmark, a fifth of its CPU time
(benchmarks/README.md). One arena that never maps or trims keeps those pages between steps.
This must happen before any other thread allocates (JAX's backend starts threads): glibc fixes
the arena limit when the first thread beyond the main one needs an arena. So whether JAX will
run on the CPU is judged from the environment and the installed plugins, not from
`jax.default_backend()`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEEP_FREED = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def _accelerator_plugins() -> list[str]:
    """JAX's installed accelerator backends: PJRT plugins (e.g. CUDA) and libtpu."""
    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec and spec.submodule_search_locations:
        names += [module.name for module in pkgutil.iter_modules(spec.submodule_search_locations)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return names


def jax_runs_on_cpu() -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS puts it first, or, with JAX_PLATFORMS
    unset, no accelerator backend is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not _accelerator_plugins()


def keep_freed_memory() -> bool:
    """On glibc, when JAX will run on the CPU: one malloc arena that never returns memory to the
    system, so each step reuses the pages of the last. Call before JAX starts its backend.
    Returns whether the allocator was changed."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not jax_runs_on_cpu():
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(option, value) == 1 for option, value in _KEEP_FREED)
