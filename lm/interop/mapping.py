"""Tensor correspondences between this project's parameters and a Hugging Face state dict.

An architecture module lists `Tensors` entries: which of our parameters (paths like
`blocks/attn/wq`, where a `blocks/` path is one layer of the stacked layers) come from which HF
tensors (names with `{i}` for the layer), and the array transforms both ways. `load_params` and
`hf_tensors` walk the entries one layer at a time, so neither direction holds the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lm.interop.safetensors_io import SafetensorsReader
from lm.runtime.mesh import state_shardings

Transform = Callable[..., tuple[np.ndarray, ...]]


def _same(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    return arrays


@dataclass(frozen=True)
class Tensors:
    """Our parameters `ours` ↔ HF tensors `hf`; `to_ours(*hf) -> ours`, `to_hf(*ours) -> hf`."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_ours: Transform = _same
    to_hf: Transform = _same

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]


def tensor(ours: str, hf: str, to_ours=None, to_hf=None) -> Tensors:
    """A one-to-one entry; the transforms map a single array (default: unchanged)."""
    wrap = lambda f: _same if f is None else (lambda a: (f(a),))
    return Tensors((ours,), (hf,), wrap(to_ours), wrap(to_hf))


def linear(ours: str, hf: str, shape: tuple[int, ...]) -> Tensors:
    """A torch Linear weight [out, in] ↔ our [in, ...] weight of `shape` (in first)."""
    return tensor(
        ours,
        hf,
        lambda w: w.T.reshape(shape),
        lambda w: w.reshape(shape[0], -1).T,
    )


def out_linear(ours: str, hf: str, shape: tuple[int, ...]) -> Tensors:
    """A torch Linear weight [out, in] ↔ our [..., out] weight of `shape` (out last)."""
    return tensor(
        ours,
        hf,
        lambda w: w.T.reshape(shape),
        lambda w: w.reshape(-1, shape[-1]).T,
    )


def _path(name: str, layer: int | None, scanned: bool) -> tuple:
    parts = tuple(name.split("/"))
    if layer is None or scanned:
        return parts
    at = parts.index("blocks") + 1
    return (*parts[:at], layer, *parts[at:])


def load_params(
    reader: SafetensorsReader,
    entries: list[Tensors],
    abstract: nnx.State,
    mesh: Mesh,
    num_layers: int,
) -> nnx.State:
    """Parameters for `abstract` (scanned layers) from HF tensors, each placed on its sharding.

    Only one parameter (with all its layers) is on the host at a time; every device receives
    just its shard.
    """
    flat = dict(nnx.to_flat_state(abstract))
    shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh)))
    values: dict[tuple, jax.Array] = {}
    for entry in entries:
        layers = range(num_layers) if entry.per_layer else [None]
        hosts: list[np.ndarray | None] = [None] * len(entry.ours)
        # One layer's HF tensors at a time, written into one preallocated host array per
        # parameter: the host holds a parameter (all its layers) plus one layer in flight.
        for k, layer in enumerate(layers):
            arrays = entry.to_ours(*(reader.get(name.format(i=layer)) for name in entry.hf))
            for j, array in enumerate(arrays):
                path = _path(entry.ours[j], None, True)
                if path not in flat:
                    raise ValueError(f"Parameter '{'/'.join(map(str, path))}' is not in the model.")
                target = flat[path]
                shape = target.shape[1:] if entry.per_layer else target.shape
                if array.shape != shape:
                    raise ValueError(
                        f"Tensor '{entry.hf[0]}' gives {'/'.join(path)} the shape "
                        f"{(len(layers), *array.shape) if entry.per_layer else array.shape}, but "
                        f"the config implies {target.shape}; config.json does not match the "
                        "weights."
                    )
                if hosts[j] is None:
                    hosts[j] = np.empty(target.shape, target.dtype)
                if entry.per_layer:
                    hosts[j][k] = array
                else:
                    hosts[j][...] = array
        for name, host in zip(entry.ours, hosts, strict=True):
            path = _path(name, None, True)
            sharding = shardings[path].get_value()
            values[path] = jax.make_array_from_callback(host.shape, sharding, host.__getitem__)
    missing = [p for p in flat if p not in values]
    if missing:
        names = ", ".join("/".join(map(str, p)) for p in missing)
        raise ValueError(f"No Hugging Face tensor maps onto parameter(s) {names}.")
    return nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat.items()])


def hf_tensors(
    params: nnx.State, entries: list[Tensors], num_layers: int, scanned: bool
) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], Callable[[str], np.ndarray]]:
    """({hf name: (shape, dtype)}, fetch(name) -> array) for `write_safetensors`.

    `fetch` copies one layer of the needed parameters from the devices and transforms it.
    """
    flat = {p: v[...] for p, v in nnx.to_flat_state(params)}
    sources: dict[str, tuple[Tensors, int | None, int]] = {}
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def ours(entry: Tensors, layer: int | None, empty: bool) -> Iterator[np.ndarray]:
        for name in entry.ours:
            array = flat[_path(name, layer, scanned)]
            if layer is not None and scanned:
                if empty:
                    yield np.empty(array.shape[1:], array.dtype)
                else:
                    yield np.asarray(array[layer])
            else:
                yield np.empty(array.shape, array.dtype) if empty else np.asarray(array)

    for entry in entries:
        for layer in range(num_layers) if entry.per_layer else [None]:
            outputs = entry.to_hf(*ours(entry, layer, empty=True))
            for j, (name, out) in enumerate(zip(entry.hf, outputs, strict=True)):
                hf_name = name.format(i=layer)
                sources[hf_name] = (entry, layer, j)
                shapes[hf_name] = (out.shape, out.dtype)

    def fetch(hf_name: str) -> np.ndarray:
        entry, layer, j = sources[hf_name]
        return entry.to_hf(*ours(entry, layer, empty=False))[j]

    return shapes, fetch
