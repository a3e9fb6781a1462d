"""One host's NVIDIA GPUs described on any machine, so a step compiles for them with none present.

Each card is one YAML file of published figures in `gpu_specs/` (its sources in its header).
`gpu_target("h100:8")` turns a card into XLA's GPU target description (`GpuTargetConfigProto`
text: compute capability, SMs, shared memory, memory size and bandwidth, clock) and asks JAX's
CUDA plugin (`pip install 'lm[cuda]'`) for that many such devices on one host; the compiler then
treats them as real GPUs, cuDNN kernels and memory limits included, on a CPU-only host.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import re

import jax
import yaml

from lm.config import ConfigError
from lm.runtime.aot import Chip, Target

_SPECS = importlib.resources.files("lm.runtime") / "gpu_specs"
# Per compute capability: resident threads per SM (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"); every card here allows 1,024 threads and 64 Ki
# registers per block, 64 Ki registers per SM, and 48 KiB of shared memory per block by default.
_THREADS_PER_SM = {"8.0": 2048, "8.6": 1536, "8.9": 1536, "9.0": 2048}
_CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def gpu_names() -> list[str]:
    """The cards `lm plan --gpu` knows, by file name."""
    return sorted(
        p.name.removesuffix(".yaml") for p in _SPECS.iterdir() if p.name.endswith(".yaml")
    )


def gpu_spec(card: str) -> dict:
    """The published figures of `card` (a name from `gpu_names()`)."""
    if card not in gpu_names():
        raise ConfigError(f"unknown GPU {card!r}; use one of {', '.join(gpu_names())}.")
    return yaml.safe_load((_SPECS / f"{card}.yaml").read_text())


def gpu_chip(spec: dict) -> Chip:
    return Chip(
        generation=spec["name"],
        memory_bytes=spec["memory_mib"] * 2**20,
        peak_bf16_flops=spec["peak_bf16_tflops"] * 1e12,
        link_bytes_per_s=spec["link_gb_per_s"] * 1e9,
        memory_bytes_per_s=spec["memory_gb_per_s"] * 1e9,
        memory=spec["memory"],
        link=spec["link"],
    )


def _cudnn_version() -> tuple[int, int, int]:
    """The cuDNN the CUDA plugin brought (its kernels are what the compiler may choose)."""
    for package in ("nvidia-cudnn-cu12", "nvidia-cudnn-cu13"):
        try:
            return tuple(int(x) for x in importlib.metadata.version(package).split(".")[:3])
        except importlib.metadata.PackageNotFoundError:
            continue
    raise ConfigError("no cuDNN is installed beside JAX's CUDA plugin; pip install 'lm[cuda]'.")


def target_config(spec: dict) -> str:
    """XLA's `GpuTargetConfigProto`, as text, for one card of `spec`."""
    major, minor = spec["compute_capability"].split(".")
    smem_per_sm = spec["shared_memory_per_sm_kib"] * 1024
    dnn = _cudnn_version()
    fields = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": smem_per_sm,
        "threads_per_core_limit": _THREADS_PER_SM[spec["compute_capability"]],
        "core_count": spec["sms"],
        "fpus_per_core": spec["fp32_lanes_per_sm"],
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(spec["memory_gb_per_s"] * 1e9),
        "l2_cache_size": spec["l2_cache_mib"] * 2**20,
        "clock_rate_ghz": spec["boost_clock_ghz"],
        "device_memory_size": spec["memory_mib"] * 2**20,
        # CUDA keeps 1 KiB of each SM's shared memory per resident block.
        "shared_memory_per_block_optin": smem_per_sm - 1024,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    info = "\n".join(f"  {k}: {v}" for k, v in fields.items())
    capability = f"  cuda_compute_capability {{ major: {major} minor: {minor} }}"
    return (
        f"gpu_device_info {{\n{info}\n{capability}\n}}\n"
        'platform_name: "CUDA"\n'
        f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}\n"
        f'device_description_str: "{spec["name"]}"\n'
    )


def cuda_plugin_available() -> bool:
    """Whether JAX's CUDA plugin is installed (found without importing it)."""
    if importlib.util.find_spec("jax_plugins") is None:  # no plugin of any kind
        return False
    return any(importlib.util.find_spec(name) is not None for name in _CUDA_PLUGINS)


def gpu_target(name: str) -> Target:
    """`name` = CARD or CARD:N (N GPUs of one host, e.g. `h100:8`), described on this host."""
    m = re.fullmatch(r"([\w.-]+?)(?::(\d+))?", name.strip().lower())
    card, count = (m.group(1), int(m.group(2) or 1)) if m else (name, 1)
    spec = gpu_spec(card)
    if count < 1:
        raise ConfigError(f"--gpu {name}: the number of GPUs after ':' must be at least 1.")
    if not cuda_plugin_available():
        raise ConfigError(
            f"planning for GPU {name!r} needs JAX's CUDA plugin; install it with "
            "pip install 'lm[cuda]' (no GPU is needed)."
        )
    # The compile is deviceless: JAX's own backend stays the CPU, so the plugin neither looks
    # for a GPU nor checks CUDA driver versions (a no-op once a backend has started).
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    # Imported here: only useful with the CUDA plugin, and a CPU run never needs it.
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="cuda", target_config=target_config(spec), topology=f"1x1x{count}"
    )
    chip = gpu_chip(spec)
    return Target(
        name=name,
        description=f"{count} x {chip.generation} on one host",
        compiler="GPU",
        devices=tuple(topology.devices),
        chip=chip,
    )
