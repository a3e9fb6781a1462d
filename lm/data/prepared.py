"""Prepared data: token ids written once by `lm data prepare`, read back by row, random access.

A prepared directory holds `manifest.json`, the tokenizer it was made with, and per split
`SPLIT/tokens-XXXXX-of-NNNNN.array_record` shards (the split's token stream, documents in
source order each led by BOS, cut into records of `chunk_tokens` int32 ids) with
`.offsets.npy` (int64: where each of the shard's documents starts, and its end) and `.json`
(the shard's counts; written last, so it marks the shard done).

`lm.data.pipeline.IndexedRows` computes rows (pack, truncate or window) from those offsets,
the same code that lays out documents tokenized in memory: a packed row r is stream tokens
[r·L, (r+1)·L], found by binary search, so opening a split reads only its manifest entry and
any row costs O(log documents) plus the records it spans, whatever the corpus size.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import grain
import numpy as np
from etils import epath

from lm.config import DataConfig, mixture_components
from lm.data.batches import StepBatcher
from lm.data.mixture import ConcatTable, MixtureBatcher
from lm.data.pipeline import IndexedRows, PretrainData, RowStats
from lm.data.prepared_format import FORMAT, MANIFEST, TOKEN_DTYPE, file_sha256
from lm.data.tokenizer import TextTokenizer, load_tokenizer, pad_id, run_tokenizer_file


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a finished prepare, or one sentence saying how to make it."""
    path = epath.Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} holds no prepared data ({MANIFEST} is missing); run "
            f"`lm data prepare --config ... data.prepared={directory}` first (an interrupted "
            "prepare resumes)."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} is format {manifest.get('format')!r}, not {FORMAT!r}; prepare it again."
        )
    return manifest


class ShardStream:
    """One prepared split's token stream (`lm.data.pipeline.TokenStream`), read from its shards
    by position."""

    def __init__(self, directory: epath.Path, split: dict, chunk_tokens: int):
        self.directory, self.chunk = directory, chunk_tokens
        self.names = [s["name"] for s in split["shards"]]
        tokens = np.array([s["tokens"] for s in split["shards"]], np.int64)
        documents = np.array([s["documents"] for s in split["shards"]], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(tokens)])
        self.doc_starts = np.concatenate([[0], np.cumsum(documents)])
        records = -(-tokens // chunk_tokens)
        self.record_starts = np.concatenate([[0], np.cumsum(records)])
        self.tokens, self.documents = int(self.shard_starts[-1]), int(self.doc_starts[-1])
        # Only documents with tokens start a new segment in a packed stream.
        self.nonempty_documents = self.documents - int(split.get("empty_documents", 0))
        # Opened on first use: start-up must not grow with the number of shards.
        self._offsets: dict[int, np.ndarray] = {}
        self._readers: dict[int, grain.sources.ArrayRecordDataSource] = {}

    def _reader(self, shard: int) -> grain.sources.ArrayRecordDataSource:
        if shard not in self._readers:
            path = self.directory / f"{self.names[shard]}.array_record"
            self._readers[shard] = grain.sources.ArrayRecordDataSource([str(path)])
        return self._readers[shard]

    def shard_offsets(self, shard: int) -> np.ndarray:
        """int64 [documents + 1]: where each document of `shard` starts in it, then its end."""
        if shard not in self._offsets:
            path = self.directory / f"{self.names[shard]}.offsets.npy"
            if "://" not in str(path):  # local: map it, so only the pages searched are read
                self._offsets[shard] = np.load(os.fspath(path), mmap_mode="r")
            else:
                self._offsets[shard] = np.load(io.BytesIO(path.read_bytes()))
        return self._offsets[shard]

    def all_offsets(self) -> np.ndarray:
        """int64 [documents + 1]: every document's start in the stream, then its end."""
        parts = [self.shard_offsets(s)[:-1] + self.shard_starts[s] for s in range(len(self.names))]
        return np.concatenate([*parts, [self.tokens]]).astype(np.int64)

    def read(self, positions: np.ndarray) -> np.ndarray:
        """int32 token ids at `positions` (any shape, each in [0, tokens))."""
        flat = np.asarray(positions, np.int64).ravel()
        if not flat.size:
            return np.zeros(np.shape(positions), np.int32)
        shard = np.searchsorted(self.shard_starts, flat, side="right") - 1
        local = flat - self.shard_starts[shard]
        record = self.record_starts[shard] + local // self.chunk
        wanted, inverse = np.unique(record, return_inverse=True)
        # Every chunk but a shard's last is full, so a chunk-sized stride addresses them all.
        table = np.zeros((len(wanted), self.chunk), np.int32)
        owner = np.searchsorted(self.record_starts, wanted, side="right") - 1
        for s in np.unique(owner):
            rows = np.flatnonzero(owner == s)
            within = [int(r) for r in wanted[rows] - self.record_starts[s]]
            for row, data in zip(rows, self._reader(int(s)).__getitems__(within), strict=True):
                ids = np.frombuffer(data, TOKEN_DTYPE)
                table[row, : len(ids)] = ids
        return table[inverse, local % self.chunk].reshape(np.shape(positions))

    def document_ids(self, positions: np.ndarray) -> np.ndarray:
        """int32 1-based global index of the document holding each of `positions`."""
        flat = np.asarray(positions, np.int64).ravel()
        shard = np.searchsorted(self.shard_starts, flat, side="right") - 1
        ids = np.zeros(flat.shape, np.int64)
        for s in np.unique(shard):
            here = shard == s
            local = flat[here] - self.shard_starts[s]
            within = np.searchsorted(self.shard_offsets(int(s)), local, side="right") - 1
            ids[here] = self.doc_starts[s] + within + 1
        return ids.astype(np.int32).reshape(np.shape(positions))


class PreparedData:
    """A prepared directory: its manifest, tokenizer file and splits."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = epath.Path(os.path.expanduser(os.fspath(directory)))
        self.manifest = read_manifest(self.directory)

    @property
    def source(self) -> str:
        return self.manifest["source"]["source"]

    @property
    def tokenizer_file(self) -> epath.Path:
        return self.directory / self.manifest["tokenizer"]["file"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def stream(self, split: str) -> ShardStream:
        """The token stream of `split`, or one sentence naming the splits there are."""
        if split not in self.manifest["splits"]:
            raise ValueError(
                f"Prepared data {self.directory} has no '{split}' split; choose one of "
                f"{sorted(self.manifest['splits'])}."
            )
        entry = self.manifest["splits"][split]
        return ShardStream(self.directory / split, entry, self.manifest["chunk_tokens"])

    def rows(
        self, split: str, seq_len: int, packing: str, stride: int = 0, pad: int = 0
    ) -> IndexedRows:
        return IndexedRows(self.stream(split), seq_len, packing, stride, pad)

    def check_tokenizer(self, path: epath.Path) -> None:
        """Refuse a tokenizer other than the one the data was prepared with, in one sentence."""
        digest = file_sha256(path)
        if digest != self.tokenizer_sha256:
            raise ValueError(
                f"Prepared data {self.directory} was tokenized with a different tokenizer "
                f"(sha256 {self.tokenizer_sha256[:12]}) than {path} (sha256 {digest[:12]}); "
                "use the tokenizer it holds (leave data.tokenizer empty in a new run) or run "
                "`lm data prepare` into another data.prepared directory."
            )

    def token_counts(self) -> dict[str, int]:
        return {split: entry["tokens"] for split, entry in self.manifest["splits"].items()}


def prepared_sources(data: DataConfig) -> list[tuple[PreparedData, float]]:
    """The prepared directories `data` trains on, with weights: the `mixture`, else `prepared`
    alone (whose manifest must be of `data.source`)."""
    if data.mixture:
        return [(PreparedData(d), w) for d, w in mixture_components(data.mixture)]
    prepared = PreparedData(data.prepared)
    if prepared.source != data.source:
        raise ValueError(
            f"Prepared data {data.prepared} holds {prepared.source} but data.source="
            f"{data.source}; set data.source={prepared.source}, or prepare {data.source} into "
            "another data.prepared directory."
        )
    return [(prepared, 1.0)]


def check_tokenizer(
    tokenizer: TextTokenizer, sources: Sequence[tuple[PreparedData, float]]
) -> None:
    """Refuse `tokenizer` unless every source was prepared with it."""
    for prepared, _ in sources:
        prepared.check_tokenizer(tokenizer.path)


def prepared_rows(
    data: DataConfig, split: str, tokenizer: TextTokenizer
) -> tuple[IndexedRows | ConcatTable, RowStats]:
    """Rows of `split` of the prepared data `data` names (a mixture's one after another) and
    their stats; refuses a tokenizer the data was not made with."""
    sources = prepared_sources(data)
    check_tokenizer(tokenizer, sources)
    tables = [
        p.rows(split, data.seq_len, data.packing, data.stride, pad_id(tokenizer))
        for p, _ in sources
    ]
    stats = combined_stats([t.stats() for t in tables])
    return (tables[0] if len(tables) == 1 else ConcatTable(tables)), stats


def combined_stats(parts: Sequence[RowStats]) -> RowStats:
    """Stats of several tables' rows taken together."""
    rows = sum(p.rows for p in parts)

    def mean(key: str) -> float:
        return sum(getattr(p, key) * p.rows for p in parts) / rows if rows else 0.0

    return RowStats(
        documents=sum(p.documents for p in parts),
        rows=rows,
        padding_fraction=mean("padding_fraction"),
        scored_fraction=mean("scored_fraction"),
        truncated_documents=sum(p.truncated_documents for p in parts),
        dropped_tokens=sum(p.dropped_tokens for p in parts),
    )


def load_prepared_data(
    data: DataConfig, run_dir: str | os.PathLike, vocab_size: int
) -> PretrainData:
    """`load_pretrain_data` for prepared data: the run's tokenizer (its own, else
    `data.tokenizer`, else the one the data holds), train batches read by row (a weighted
    mixture when `data.mixture` is set) and validation rows; nothing is tokenized here."""
    sources = prepared_sources(data)
    own = run_tokenizer_file(run_dir)
    configured = epath.Path(os.path.expanduser(data.tokenizer)) if data.tokenizer else None
    tokenizer = load_tokenizer(own or configured or sources[0][0].tokenizer_file)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"Tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={vocab_size}; set model.vocab_size={tokenizer.vocab_size}."
        )
    check_tokenizer(tokenizer, sources)
    pad = pad_id(tokenizer)
    tables = [p.rows("train", data.seq_len, data.packing, data.stride, pad) for p, _ in sources]
    if data.mixture:
        names = [str(p.directory) for p, _ in sources]
        weights = [w for _, w in sources]
        train = MixtureBatcher(tables, weights, data.batch_size, data.seed, names)
    else:
        train = StepBatcher(tables[0], data.batch_size, data.seed)
    validation, validation_stats = prepared_rows(data, "validation", tokenizer)
    return PretrainData(
        tokenizer=tokenizer,
        train=train,
        validation=validation,
        token_bytes=tokenizer.token_bytes(),
        train_stats=combined_stats([t.stats() for t in tables]),
        validation_stats=validation_stats,
    )
