"""Text documents as TFDS array_record builds, read back with random access (no TensorFlow).

A build is keyed by a hash of its documents: the same content is prepared once and reused
from `data_dir`; changed content gets a new config and is prepared afresh.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from lm.data.shakespeare import shakespeare_documents
from lm.data.tfds_named import TextSplit, tfds_documents

SPLITS = ("train", "validation")
logger = logging.getLogger(__name__)


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes in-memory documents, one `text` feature per example."""

    name = "lm_text"
    VERSION = tfds.core.Version("1.0.0")
    # No code folder (checksums, metadata): TFDS's lookup of it needs `importlib_resources`.
    code_path = None

    def __init__(self, documents: dict[str, list[str]], **kwargs):
        self._documents = documents
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: `dataset_info_from_configs` looks for metadata next to the builder's
        # module, which a builder living outside its own package folder does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text documents.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # keep documents in the order given
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything comes from memory; nothing is downloaded
        # TFDS cannot write an empty split; `build_text_dataset` serves those itself.
        return {
            split: self._generate_examples(docs) for split, docs in self._documents.items() if docs
        }

    def _generate_examples(self, docs: list[str]):
        for i, doc in enumerate(docs):
            yield i, {"text": doc}


def content_hash(documents: dict[str, list[str]]) -> str:
    """A hex digest of the splits and their documents (length-prefixed, so it is unambiguous)."""
    h = hashlib.sha256()
    for split in sorted(documents):
        h.update(f"{split}:{len(documents[split])}:".encode())
        for doc in documents[split]:
            data = doc.encode()
            h.update(f"{len(data)}:".encode())
            h.update(data)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Hide TFDS's progress bars and its per-step logging (it warns about every custom config)."""
    absl_logger = logging.getLogger("absl")
    level, bars = absl_logger.level, tqdm_utils._active
    absl_logger.setLevel(logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        absl_logger.setLevel(level)
        tfds.display_progress_bar(bars)


def build_text_dataset(
    documents: dict[str, list[str]], data_dir: str | Path, name: str
) -> dict[str, Sequence[str]]:
    """Prepare (or reuse) a TFDS build of `documents` under `data_dir`; split -> documents."""
    config = tfds.core.BuilderConfig(name=f"{name}_{content_hash(documents)[:16]}")
    with _quiet_tfds():
        builder = _TextBuilder(
            documents,
            config=config,
            data_dir=str(Path(data_dir).expanduser()),
            file_format="array_record",
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return {
        split: TextSplit(builder.as_data_source(split=split)) if docs else []
        for split, docs in documents.items()
    }


def _txt_files(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(path.rglob("*.txt"))
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def _hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for `key`: a hash, not a random draw, so splits never drift."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def hold_out(keys: Sequence[str], fraction: float) -> list[bool]:
    """Which items go to validation: those whose key hashes below `fraction`.

    With two or more items and a positive fraction, at least one is held out and at least one
    kept for training; fraction 0 holds out nothing (e.g. training a tokenizer on everything).
    """
    held = [_hash_fraction(key) < fraction for key in keys]
    if fraction > 0 and not any(held) and len(keys) >= 2:  # something to evaluate on
        held[min(range(len(keys)), key=lambda i: _hash_fraction(keys[i]))] = True
    if held and all(held):  # and always keep something to train on
        held[0] = False
    return held


def read_utf8(path: Path) -> str:
    """The text of `path`, or one sentence naming the file and the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte offset {e.start}); re-encode it as UTF-8."
        ) from None


UNITS = ("file", "line", "paragraph")
# One or more blank (whitespace-only) lines end a paragraph.
_PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[ \t\f\v]*\r?\n)+")


def split_units(text: str, unit: str) -> tuple[list[str], int]:
    """`text` cut into documents by `unit`, and how many empty (whitespace-only) units were skipped.

    'file' keeps the text whole; 'line' drops line endings; 'paragraph' splits at blank lines.
    """
    if unit == "file":
        pieces = [text]
    elif unit == "line":
        pieces = text.split("\n")
        if text.endswith("\n"):
            pieces.pop()  # a final newline ends the last line; it does not start an empty one
        pieces = [line.removesuffix("\r") for line in pieces]
    elif unit == "paragraph":
        pieces = [p.rstrip("\r\n") for p in _PARAGRAPH_BREAK.split(text)]
    else:
        raise ValueError(f"Unknown unit '{unit}'; choose one of {', '.join(UNITS)}.")
    kept = [p for p in pieces if p.strip()]
    return kept, len(pieces) - len(kept)


def local_text_documents(
    pattern: str, validation_fraction: float, unit: str = "file"
) -> dict[str, list[str]]:
    """UTF-8 `.txt` files from a file, directory or glob, split into documents by `unit`.

    Whole files go to one split, by a hash of their path. Empty units are skipped and their
    count logged as a warning.
    """
    if unit not in UNITS:
        raise ValueError(f"Unknown unit '{unit}'; choose one of {', '.join(UNITS)}.")
    files = _txt_files(pattern)
    if not files:
        raise FileNotFoundError(
            f"No text files match data.source='{pattern}'; pass a .txt file, a directory of "
            ".txt files or a glob such as 'corpus/*.txt'."
        )
    units: dict[Path, list[str]] = {}
    skipped = 0
    for path in files:
        kept, empty = split_units(read_utf8(path), unit)
        skipped += empty
        if kept:
            units[path] = kept
    if skipped:
        logger.warning("Skipped %d empty %s(s) in data.source='%s'.", skipped, unit, pattern)
    if not units:
        raise ValueError(f"The files matching data.source='{pattern}' hold no text.")
    paths = list(units)
    held = hold_out([str(p) for p in paths], validation_fraction)
    return {
        "train": [doc for p, h in zip(paths, held, strict=True) if not h for doc in units[p]],
        "validation": [doc for p, h in zip(paths, held, strict=True) if h for doc in units[p]],
    }


def load_documents(
    source: str,
    data_dir: str | Path,
    validation_fraction: float,
    text_key: str | None = None,
    unit: str = "file",
) -> dict[str, Sequence[str]]:
    """Documents of `source` per split: 'shakespeare', 'tfds:NAME' or local text files.

    Local text files become one document per `unit` ('file', 'line' or 'paragraph').

    'tfds:NAME' (e.g. 'tfds:lm1b', 'tfds:glue/sst2') reads a dataset already prepared under
    `data_dir`: feature `text_key` (None: its default text feature) of its 'train' split, and
    of 'validation', or 'test' when it has no validation split (see `tfds_documents`).
    """
    if source.startswith("tfds:"):
        name = source.removeprefix("tfds:")
        # Keep URLs (gs://...) intact: Path() would collapse their double slash.
        local = "://" not in str(data_dir)
        return tfds_documents(
            name, str(Path(data_dir).expanduser()) if local else str(data_dir), text_key
        )
    if source == "shakespeare":
        documents = {split: shakespeare_documents(split) for split in SPLITS}
        return build_text_dataset(documents, data_dir, "shakespeare")
    documents = local_text_documents(source, validation_fraction, unit)
    return build_text_dataset(documents, data_dir, "local")
