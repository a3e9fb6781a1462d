"""Text documents as TFDS array_record builds, read back with random access (no TensorFlow).

A build is keyed by a hash of its documents: the same content is prepared once and reused
from `data_dir`; changed content gets a new config and is prepared afresh.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from lm.data.shakespeare import shakespeare_documents

SPLITS = ("train", "validation")


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


class TextSplit(Sequence[str]):
    """Random-access documents of one split: feature `key` of a data source, as str."""

    def __init__(self, source: Sequence[dict], key: str = "text"):
        self._source = source
        self._key = key

    def __len__(self) -> int:
        return len(self._source)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} out of range for a split of {len(self)}")
        text = self._source[index % len(self)][self._key]
        return text.decode() if isinstance(text, bytes) else text


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


def _in_validation(path: Path, fraction: float) -> bool:
    # A hash of the path, not a random draw: the same file always lands in the same split.
    digest = hashlib.sha256(str(path).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def local_text_documents(pattern: str, validation_fraction: float) -> dict[str, list[str]]:
    """UTF-8 `.txt` files from a file, directory or glob, one document per file, split by path."""
    files = _txt_files(pattern)
    if not files:
        raise FileNotFoundError(
            f"No text files match data.source='{pattern}'; pass a .txt file, a directory of "
            ".txt files or a glob such as 'corpus/*.txt'."
        )
    texts: dict[Path, str] = {}
    for path in files:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path} is not valid UTF-8 (byte offset {e.start}); re-encode it as UTF-8."
            ) from None
        if text.strip():
            texts[path] = text
    if not texts:
        raise ValueError(f"The files matching data.source='{pattern}' hold no text.")
    validation = [p for p in texts if _in_validation(p, validation_fraction)]
    if not validation and len(texts) >= 2:  # always hold something out to evaluate on
        validation = [min(texts, key=lambda p: hashlib.sha256(str(p).encode()).digest())]
    if len(validation) == len(texts):  # and always keep something to train on
        validation = validation[1:]
    return {
        "train": [texts[p] for p in texts if p not in validation],
        "validation": [texts[p] for p in validation],
    }


def load_documents(
    source: str, data_dir: str | Path, validation_fraction: float, text_key: str | None = None
) -> dict[str, Sequence[str]]:
    """Documents of `source` per split: 'shakespeare', 'tfds:NAME' or local text files.

    'tfds:NAME' (e.g. 'tfds:lm1b', 'tfds:glue/sst2') reads a dataset already prepared under
    `data_dir`: feature `text_key` (None: its default text feature) of its 'train' split, and
    of 'validation', or 'test' when it has no validation split (see `tfds_documents`).
    """
    if source.startswith("tfds:"):
        # Imported here: tfds_named reads its splits through TextSplit, defined above.
        from lm.data.tfds_named import tfds_documents

        name = source.removeprefix("tfds:")
        return tfds_documents(name, str(Path(data_dir).expanduser()), text_key)
    if source == "shakespeare":
        documents = {split: shakespeare_documents(split) for split in SPLITS}
        return build_text_dataset(documents, data_dir, "shakespeare")
    documents = local_text_documents(source, validation_fraction)
    return build_text_dataset(documents, data_dir, "local")
