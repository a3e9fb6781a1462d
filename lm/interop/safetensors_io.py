"""Read and write Hugging Face safetensors files one tensor at a time, without torch.

A model directory holds `model.safetensors`, or shards `model-0000X-of-0000N.safetensors` listed
by `model.safetensors.index.json`. Reading parses each file's JSON header once and then reads a
tensor's bytes only when asked for, with plain file reads rather than a memory map: mapped pages
of every file read would stay resident beside the converted parameters, doubling the peak memory
of a conversion. Writing streams tensors to disk in the same format, so neither side ever holds a
whole model in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_DTYPES = {
    code: np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
    for name, code in _DTYPE_NAMES.items()
}


def _read_header(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """{tensor name: (dtype, shape, absolute byte offset)} of one safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}.")
        start = 8 + length + info["data_offsets"][0]
        tensors[name] = (_DTYPES[info["dtype"]], tuple(info["shape"]), start)
    return tensors


class SafetensorsReader:
    """Lazy access to every tensor of a model directory (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index, single = self.model_dir / INDEX_FILE, self.model_dir / SINGLE_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            weight_map = {}
        else:
            raise FileNotFoundError(
                f"{self.model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; pass a Hugging "
                "Face model directory saved with safetensors (save_pretrained's default)."
            )
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._where = {
            key: (self.model_dir / name, *entry)
            for name in files
            for key, entry in _read_header(self.model_dir / name).items()
        }

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._where))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> np.ndarray:
        """The tensor `key`, read from disk now; a missing key is named in the error."""
        if key not in self._where:
            raise ValueError(
                f"{self.model_dir} has no tensor '{key}'; the checkpoint is incomplete or "
                "was saved by a different architecture than its config.json names."
            )
        path, dtype, shape, start = self._where[key]
        count = int(np.prod(shape, dtype=np.int64))
        with open(path, "rb") as f:
            f.seek(start)
            return np.fromfile(f, dtype=dtype, count=count).reshape(shape)

    def close(self) -> None:
        """Nothing stays open between reads; kept so the reader works as a context manager."""

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(
    path: str | Path,
    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    fetch: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors `shapes` = {name: (shape, dtype)} to `path`, calling `fetch(name)` for each
    in turn, so at most one tensor is in memory. The header is written first from the shapes."""
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _DTYPE_NAMES[np.dtype(dtype).name],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, (shape, dtype) in shapes.items():
            array = np.ascontiguousarray(fetch(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"Tensor '{name}' has shape {array.shape}, expected {shape}.")
            out.write(array.tobytes())
