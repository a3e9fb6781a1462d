"""Named TFDS datasets (lm1b, imdb_reviews, glue/sst2, ...) read with random access, no TensorFlow.

Datasets must already be prepared as array_record under `data_dir`; nothing is downloaded.
Every mistake (unknown name, missing feature, unprepared data, tfrecord-only data) stops with
one sentence before any training starts.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core.registered import DatasetNotFoundError

_TFDS_ROOT = Path(tfds.__file__).parent
# Packages of tensorflow_datasets that hold library code, not dataset modules.
_NOT_DATASETS = {"core", "proto", "scripts", "testing"}


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


def _legacy_modules() -> dict[str, str]:
    """Dataset family -> module, for datasets that register only once imported (glue, conll2003)."""
    modules = {}
    for path in [*_TFDS_ROOT.glob("*/*.py"), *_TFDS_ROOT.glob("*/*/__init__.py")]:
        module = path.relative_to(_TFDS_ROOT).with_suffix("")
        if module.name == "__init__":
            module = module.parent
        if module.parts[0] in _NOT_DATASETS or module.name.startswith("_"):
            continue
        if not module.name.endswith(("_test", "_utils")):
            modules[module.name] = ".".join(["tensorflow_datasets", *module.parts])
    return modules


def _suggestion(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean '{close[0]}'?" if close else "."


def _builder_cls(family: str) -> type[tfds.core.DatasetBuilder]:
    try:
        return tfds.builder_cls(family)
    except DatasetNotFoundError:
        pass
    legacy = _legacy_modules()
    if family in legacy:
        importlib.import_module(legacy[family])
        return tfds.builder_cls(family)
    known = sorted({*tfds.list_builders(with_community_datasets=False), *legacy})
    raise ValueError(f"Unknown TFDS dataset '{family}'{_suggestion(family, known)}")


def tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Builder of `name` ('family[/config][:version]'), importing its module if TFDS needs it."""
    family, _, rest = name.partition("/")
    family = family.split(":")[0]
    cls = _builder_cls(family)
    config = rest.split(":")[0]
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    if config and configs and config not in configs:
        options = [f"{family}/{c}" for c in configs]
        raise ValueError(
            f"TFDS dataset '{family}' has no config '{config}'"
            f"{_suggestion(f'{family}/{config}', options)}"
        )
    return tfds.builder(name, data_dir=data_dir)


def _explain_unreadable(builder: tfds.core.DatasetBuilder, name: str, data_dir: str | None) -> None:
    """Raise a one-sentence reason why `builder` cannot be opened as a data source, if known."""
    root = data_dir or str(builder._data_dir_root)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset '{name}' is not prepared in {builder.data_dir} and downloads are off; "
            f"on a machine with network run `tfds build {name} --data_dir {root} "
            f'--file_format array_record` (or python -c "import tensorflow_datasets as tfds; '
            f"tfds.builder('{name}', data_dir='{root}', file_format='array_record')"
            f'.download_and_prepare()") and copy {root} here.'
        )
    random_access = set(file_adapters.FileFormat.with_random_access())
    if not builder.info.available_file_formats() & random_access:
        raise ValueError(
            f"TFDS dataset '{name}' in {builder.data_dir} is prepared as "
            f"{builder.info.file_format.value} only, which needs TensorFlow: install the optional "
            "extra (pip install 'lm[tf]') or re-prepare it with file_format='array_record'."
        )


def _records(
    builder: tfds.core.DatasetBuilder, name: str, split: str, data_dir: str | None
) -> Sequence[dict]:
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception:
        # TFDS's own errors here are multi-line and often misleading (an unprepared dataset
        # reports an unsupported tfrecord format), so name the real cause when it is known.
        _explain_unreadable(builder, name, data_dir)
        raise


def _text_features(builder: tfds.core.DatasetBuilder) -> list[str]:
    features = builder.info.features
    return [k for k in features if isinstance(features[k], tfds.features.Text)]


def _default_text_key(builder: tfds.core.DatasetBuilder, name: str) -> str:
    texts = _text_features(builder)
    if "text" in texts:
        return "text"
    if len(texts) == 1:
        return texts[0]
    raise ValueError(
        f"TFDS dataset '{name}' has {len(texts)} text features, so one must be chosen; "
        f"available: {', '.join(sorted(builder.info.features))}. Set data.text_key=..."
    )


def _texts(
    builder: tfds.core.DatasetBuilder, name: str, split: str, data_dir: str | None, key: str
) -> Sequence[str]:
    features = builder.info.features
    if key not in features:
        raise ValueError(
            f"Feature '{key}' is not in {name}; available: {', '.join(sorted(features))}. "
            "Set data.text_key=..."
        )
    texts = _text_features(builder)
    if key not in texts:
        raise ValueError(
            f"Feature '{key}' of {name} is {type(features[key]).__name__}, not text; "
            f"text features: {', '.join(texts) or 'none'}. Set data.text_key=..."
        )
    return TextSplit(_records(builder, name, split, data_dir), key=key)


def tfds_documents(
    name: str, data_dir: str | None, text_key: str | None = None
) -> dict[str, Sequence[str]]:
    """'train' and 'validation' texts; validation reads the 'test' split if there is none.

    `text_key` None means 'text', or else the dataset's only text feature ('sentence' for
    glue/sst2).
    """
    builder = tfds_builder(name, data_dir)
    key = text_key or _default_text_key(builder, name)
    # No split names (as under tfds.testing.mock_data) means any split may be asked for.
    splits = list(builder.info.splits)
    held_out = "validation"
    if splits and "validation" not in splits:
        if "test" not in splits:
            raise ValueError(
                f"TFDS dataset '{name}' has no validation or test split to evaluate on; "
                f"its splits: {', '.join(splits)}."
            )
        held_out = "test"
    return {
        "train": _texts(builder, name, "train", data_dir, key),
        "validation": _texts(builder, name, held_out, data_dir, key),
    }
