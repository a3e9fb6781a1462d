"""Multi-host start-up: join JAX's multi-controller runtime (`jax.distributed`) when asked to.

Every process of a multi-host run executes the same program on its own devices; JAX's
coordination service (process 0 hosts it) wires them together and XLA's collectives move the
data. Where the request comes from, first match wins:

1. explicit arguments (`lm pretrain --coordinator HOST:PORT --num-processes N --process-id I`);
2. `LM_COORDINATOR`, `LM_NUM_PROCESSES`, `LM_PROCESS_ID` (launch/local.sh, launch/slurm.sbatch);
3. SLURM with more than one task (`SLURM_NTASKS` > 1): JAX's own SLURM detection;
4. a Cloud TPU VM (TPU chips on the PCI bus): JAX's own TPU detection, no arguments.

Anything else is a single-process run, which never calls `jax.distributed`; a one-host TPU VM
joins as a one-process run, as Google recommends for TPUs. `LM_DISTRIBUTED=off` turns the
automatic detection (3 and 4) off. `LM_HEARTBEAT_S` and `LM_SHUTDOWN_TIMEOUT_S` shorten how
long survivors wait for a dead peer (JAX: 100 s, 300 s).

Joining also starts JAX's preemption notifier: SIGTERM on any process is passed to all of them
through the coordination service, and `preemption_sync_point` tells the training loop the one
step at which every process stops and checkpoints (lm/train/preemption.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
from jax._src import hardware_utils
from jax.experimental import multihost_utils

T = TypeVar("T")

ENV_COORDINATOR = "LM_COORDINATOR"
ENV_NUM_PROCESSES = "LM_NUM_PROCESSES"
ENV_PROCESS_ID = "LM_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How to call `jax.distributed.initialize`; None fields are left to JAX's cluster detection."""

    source: str  # flags | env | slurm | tpu
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 100
    shutdown_timeout_s: int = 300


def _tpu_vm_present() -> bool:
    # JAX's own probe (PCI vendor/device ids); reads /sys only and starts no backend.
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be a whole number.") from None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
    tpu_present: bool | None = None,
) -> DistributedSpec | None:
    """The multi-host request in arguments or `env` (default os.environ); None = single process."""
    env = os.environ if env is None else env
    timeouts = {
        "heartbeat_timeout_s": int(env.get("LM_HEARTBEAT_S", 100)),
        "shutdown_timeout_s": int(env.get("LM_SHUTDOWN_TIMEOUT_S", 300)),
    }
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "--coordinator, --num-processes and --process-id go together; pass all three "
                "(or none, to read them from the environment)."
            )
        spec = DistributedSpec("flags", coordinator, num_processes, process_id, **timeouts)
    elif any(name in env for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
        missing = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if n not in env]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} not set: a multi-process run needs {ENV_COORDINATOR} "
                f"(host:port of process 0), {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}."
            )
        spec = DistributedSpec(
            "env",
            env[ENV_COORDINATOR],
            _int_var(env, ENV_NUM_PROCESSES),
            _int_var(env, ENV_PROCESS_ID),
            **timeouts,
        )
    elif env.get("LM_DISTRIBUTED") == "off":
        return None
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistributedSpec("slurm", **timeouts)
    elif _tpu_vm_present() if tpu_present is None else tpu_present:
        return DistributedSpec("tpu", **timeouts)
    else:
        return None
    if spec.num_processes < 1 or not 0 <= spec.process_id < spec.num_processes:
        raise ValueError(
            f"Process id {spec.process_id} is not in [0, {spec.num_processes}); number the "
            "processes 0 .. num_processes - 1."
        )
    return None if spec.num_processes == 1 else spec


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> DistributedSpec | None:
    """Join the multi-host run the arguments or environment describe; a no-op for one process.

    Call it before anything touches a JAX device. Calling it again is harmless.
    """
    spec = resolve(coordinator, num_processes, process_id)
    if spec is None or jax.distributed.is_initialized():
        return spec
    # Only the CPU backend needs telling which collectives to use (GPU: NCCL, TPU: ICI/DCN).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The training loop's stop step on SIGTERM comes from this service (preemption_sync_point).
    jax.config.update("jax_enable_preemption_service", True)
    jax.distributed.initialize(
        coordinator_address=spec.coordinator,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        heartbeat_timeout_seconds=spec.heartbeat_timeout_s,
        shutdown_timeout_seconds=spec.shutdown_timeout_s,
    )
    return spec


def preemption_sync_point() -> Callable[[int], bool] | None:
    """`reached_preemption_sync_point(step)` when this process joined a run through
    `jax.distributed` (whose notifier then owns SIGTERM), else None."""
    if not jax.distributed.is_initialized():
        return None
    return multihost_utils.reached_preemption_sync_point


def process_zero_first(name: str, fn: Callable[[], T]) -> T:
    """`fn()` on process 0, then on the others: for work whose files the others then read."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(name)
    return fn() if result is None else result
