"""The prepared-data format's names, shared by its writer (`lm.data.prepared_write`) and
reader (`lm.data.prepared`); light to import, so prepare's worker processes start fast."""

from __future__ import annotations

import hashlib

import numpy as np
from etils import epath

FORMAT = "lm-prepared/1"
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<i4")


def shard_name(index: int, count: int) -> str:
    """'tokens-00003-of-00016': the stem of a shard's .array_record, .offsets.npy and .json."""
    return f"tokens-{index:05d}-of-{count:05d}"


def file_sha256(path: epath.Path) -> str:
    """Hex digest of a file's bytes (a tokenizer's identity)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
