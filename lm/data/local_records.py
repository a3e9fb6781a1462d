"""Structured local records (JSON Lines and CSV) as cached TFDS builds, read back as dicts.

Each record is stored as its canonical JSON (sorted keys, no spaces) in the `text` feature of the
local-text builder, so any columns work and the same content is prepared only once.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm.data.sources import hold_out, read_utf8

EXTENSIONS = (".jsonl", ".csv")


class Record(dict):
    """A record's columns, plus `where` it was read from ('FILE line N'), for error messages."""

    __slots__ = ("where",)

    def __init__(self, columns: dict[str, Any], where: str):
        super().__init__(columns)
        self.where = where


def record_name(record: dict[str, Any], index: int) -> str:
    """How an error names `record`: its file and line when it came from one, else its index."""
    return getattr(record, "where", f"Record {index}")


def canonical_json(record: dict[str, Any]) -> str:
    """One spelling per record: sorted keys, no spaces, non-ASCII kept as is."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _record_files(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in EXTENSIONS and p.is_file())
    if path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    for file in files:
        if file.suffix not in EXTENSIONS:
            raise ValueError(f"{file} is neither a .jsonl nor a .csv file.")
    return files


def _jsonl_records(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    # Split at "\n" only: splitlines() would also cut at U+2028, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():  # blank lines (a trailing one especially) separate nothing
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not valid JSON ({e.msg}).") from None
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise ValueError(f"{path} line {number} is a JSON {kind}, not an object.")
        records.append(Record(record, f"{path} line {number}"))
    return records


def _csv_records(path: Path, text: str) -> list[dict[str, str]]:
    # newline="": the csv module handles line endings itself, also inside quoted fields.
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    records = []
    line = 1  # where the next row starts; a quoted field may span several lines
    for row in reader:
        start, line = line, reader.line_num + 1
        if not row:  # blank line
            continue
        if header is None:
            header = row
            if len(set(header)) != len(header):
                raise ValueError(f"{path} has a repeated column name in its header.")
        elif len(row) != len(header):
            raise ValueError(
                f"{path} line {start} has {len(row)} fields but the header has {len(header)}."
            )
        else:
            records.append(Record(dict(zip(header, row, strict=True)), f"{path} line {start}"))
    return records


def local_records(pattern: str, validation_fraction: float) -> dict[str, list[dict[str, Any]]]:
    """Records of `.jsonl` and `.csv` files from a file, directory (recursive) or glob, per split.

    JSONL: one JSON object per line. CSV: a header row, then string values. A record goes to
    validation by a hash of its canonical JSON, so the split does not depend on which file holds
    it or in what order; within a split records keep file order.
    """
    files = _record_files(pattern)
    if not files:
        raise FileNotFoundError(
            f"No .jsonl or .csv files match '{pattern}'; pass a file, a directory of them or a "
            "glob such as 'records/*.jsonl'."
        )
    records: list[dict[str, Any]] = []
    for path in files:
        text = read_utf8(path).removeprefix("\ufeff")  # spreadsheet exports often start with a BOM
        parse = _jsonl_records if path.suffix == ".jsonl" else _csv_records
        records.extend(parse(path, text))
    if not records:
        raise ValueError(f"The files matching '{pattern}' hold no records.")
    held = hold_out([canonical_json(r) for r in records], validation_fraction)
    return {
        "train": [r for r, h in zip(records, held, strict=True) if not h],
        "validation": [r for r, h in zip(records, held, strict=True) if h],
    }


def require_columns(records: Sequence[dict[str, Any]], columns: Sequence[str], source: str) -> None:
    """Stop with one sentence unless every record has every one of `columns`."""
    if not records:
        return
    available = ", ".join(sorted(records[0]))
    for column in columns:
        if column not in records[0]:
            raise ValueError(f"Column '{column}' is not in {source}; available: {available}.")
    for index, record in enumerate(records):
        for column in columns:
            if column not in record:
                name = getattr(record, "where", f"Record {index} of {source}")
                raise ValueError(f"{name} has no column '{column}'.")
