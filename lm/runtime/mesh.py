"""Device mesh, the one logical-axis → mesh-axis rules table, and sharding helpers.

Parameters and activations name their dimensions with logical axes ('embed', 'heads', ...).
`RULES` maps each logical axis to mesh axes of the mesh ('data', 'fsdp', 'tensor'). A mapping is
dropped for a dimension the mesh axes do not divide (e.g. one kv head on a 4-way tensor axis),
so every config runs on every mesh; such dimensions are replicated instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lm.config import ConfigError, MeshConfig, mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "kv": (),
    "layers": (),
    "norm": (),
    "position": (),
    # activations (distinct names: a mesh axis may appear only once per array)
    "act_batch": ("data", "fsdp"),
    "act_length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), -1 filling the rest.

    With `dcn_*` sizes above 1 the mesh is hybrid: each slice (TPU slice, or host where devices
    carry no slice index, as on GPU and CPU) holds a whole `data x fsdp x tensor` block, so
    only the `dcn_*` part of an axis crosses the slow network.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if cfg.num_slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    ici = tuple(total // dcn for total, dcn in zip(shape, cfg.dcn, strict=True))
    by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
    granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    if granules != cfg.num_slices:
        raise ConfigError(
            f"mesh.dcn_* = {list(cfg.dcn)} asks for {cfg.num_slices} slices but the devices "
            f"come from {granules} {'slices' if by_slice else 'processes'}; make the dcn_* "
            f"product {granules}."
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, cfg.dcn, devices, process_is_granule=not by_slice
    )
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(
    logical: Sequence[str | None] | None, shape: Sequence[int], mesh_shape_: dict[str, int]
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry `logical` axis names."""
    if not logical:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape, strict=True):
        axes = (
            [a for a in RULES.get(name, ()) if a in mesh_shape_ and a not in used] if name else []
        )
        axes = [a for a in axes if mesh_shape_[a] > 1]
        if axes and size % int(np.prod([mesh_shape_[a] for a in axes])) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else tuple(axes))
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout under the mesh set by `jax.set_mesh`; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every variable of an abstract NNX state, from its `out_sharding` names."""
    sizes = dict(mesh.shape)

    def one(v: nnx.Variable) -> nnx.Variable:
        logical = v.get_metadata().get("out_sharding")
        return v.replace(NamedSharding(mesh, logical_to_spec(logical, v.shape, sizes)))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split their leading dimension over ('data', 'fsdp')."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble every process's local rows into global arrays laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
