"""`lm data prepare`'s work: tokenize a source once into sharded ArrayRecord files (see
`lm.data.prepared` for the layout), in parallel over worker processes and hosts.

Each split's documents are cut into `shards` contiguous ranges; a shard is a pure function of
(source, tokenizer, range), written under a temporary name and published when complete, its
`.json` last. So an interrupted prepare resumes at the first missing shard and yields the same
bytes, several hosts can each take a disjoint slice of the shards, and the manifest appears
once every shard is done. `plan.json`, written first, pins the source, tokenizer and shard
counts: a later call with another source or tokenizer is refused rather than mixed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from lm.data.prepared_format import FORMAT, MANIFEST, TOKEN_DTYPE, file_sha256, shard_name
from lm.data.shakespeare import shakespeare_documents
from lm.data.sources import SPLITS, content_hash, load_documents, local_text_documents
from lm.data.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer

PLAN = "plan.json"
CHUNK_TOKENS = 4096  # ids per record: 16 KiB, a few records per row at seq_len 2048
DOCS_PER_SHARD = 50_000  # default shard size: resumable pieces of a few minutes' work
MIN_SHARDS = 8  # enough pieces to keep every worker busy on small corpora
# A tokenizer trained here learns from at most this many train documents (the first ones): a
# large enough sample for its pieces, and what fits in memory (the whole of lm1b would not).
TOKENIZER_DOCUMENTS = 1_000_000


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What names a source (the `data.*` keys `load_documents` reads); workers re-open it."""

    source: str
    data_dir: str
    validation_fraction: float
    text_key: str = ""
    text_unit: str = "file"


def source_documents(spec: SourceSpec) -> dict[str, Sequence[str]]:
    """Documents per split: a named TFDS dataset random-access, local text in memory."""
    if spec.source.startswith("tfds:"):
        return load_documents(
            spec.source, spec.data_dir, spec.validation_fraction, spec.text_key or None
        )
    if spec.source == "shakespeare":
        return {split: shakespeare_documents(split) for split in SPLITS}
    return local_text_documents(spec.source, spec.validation_fraction, spec.text_unit)


def source_identity(spec: SourceSpec, documents: dict[str, Sequence[str]]) -> dict:
    """What must match for prepared data to stand for `spec`: the name and its settings,
    documents per split, and for local text a hash of every document."""
    identity: dict = {"source": spec.source}
    if spec.source.startswith("tfds:"):
        identity["text_key"] = spec.text_key
    else:
        if spec.source != "shakespeare":
            identity |= {
                "text_unit": spec.text_unit,
                "validation_fraction": spec.validation_fraction,
            }
        identity["content_sha256"] = content_hash({k: list(v) for k, v in documents.items()})
    identity["documents"] = {split: len(docs) for split, docs in documents.items()}
    return identity


def default_shards(documents: int) -> int:
    """Shards for a split: ~DOCS_PER_SHARD documents each, at least MIN_SHARDS, none empty."""
    return max(1, min(documents, max(MIN_SHARDS, math.ceil(documents / DOCS_PER_SHARD))))


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One shard to write: documents [start, stop) of `split` (`texts`: those documents, for
    sources held in memory; None: the worker opens the source itself)."""

    directory: str
    split: str
    index: int
    count: int
    start: int
    stop: int
    spec: SourceSpec
    tokenizer: str
    chunk_tokens: int
    texts: tuple[str, ...] | None = None


# Per worker process: the source and tokenizer, opened once for all the shards it writes.
_OPENED: dict[tuple, object] = {}


def _opened(key: tuple, make: Callable[[], object]) -> object:
    if key not in _OPENED:
        _OPENED[key] = make()
    return _OPENED[key]


def write_shard(job: ShardJob) -> dict:
    """Tokenize documents [start, stop) and write the shard; returns its counts."""
    docs = job.texts
    if docs is None:
        split = _opened(("source", job.spec), lambda: source_documents(job.spec))[job.split]
        docs = split[job.start : job.stop]
    tokenizer: TextTokenizer = _opened(
        ("tokenizer", job.tokenizer), lambda: load_tokenizer(job.tokenizer)
    )
    lead = [] if tokenizer.bos is None else [tokenizer.bos]
    directory = epath.Path(job.directory) / job.split
    name = shard_name(job.index, job.count)
    offsets, pending, held = [0], [], 0
    counts = {"name": name, "documents": job.stop - job.start, "tokens": 0, "bytes": 0}
    counts["empty_documents"] = 0
    with tempfile.TemporaryDirectory() as tmp:
        # ArrayRecord writes local files: write here, publish into the (maybe gs://) directory.
        local = Path(tmp) / f"{name}.array_record"
        writer = ArrayRecordWriter(str(local), "group_size:1")
        for text in docs:
            # One document at a time on this core: the parallelism is across processes.
            ids = np.array(lead + tokenizer.encode(text), TOKEN_DTYPE)
            counts["bytes"] += len(text.encode())
            counts["empty_documents"] += not len(ids)
            offsets.append(offsets[-1] + len(ids))
            pending.append(ids)
            held += len(ids)
            if held >= job.chunk_tokens:
                stream = np.concatenate(pending)
                full = len(stream) // job.chunk_tokens * job.chunk_tokens
                for at in range(0, full, job.chunk_tokens):
                    writer.write(stream[at : at + job.chunk_tokens].tobytes())
                pending, held = [stream[full:]], len(stream) - full
        if held:
            writer.write(np.concatenate(pending).tobytes())
        writer.close()
        counts["tokens"] = offsets[-1]
        np.save(Path(tmp) / "offsets.npy", np.array(offsets, np.int64))
        directory.mkdir(parents=True, exist_ok=True)
        # The .json goes last: a shard without it is unfinished and is written again.
        for src, dst in (
            (local, f"{name}.array_record"),
            (Path(tmp) / "offsets.npy", f"{name}.offsets.npy"),
        ):
            epath.Path(src).copy(directory / dst, overwrite=True)
        (directory / f"{name}.json").write_text(json.dumps(counts))
    return counts


def _check_same(kind: str, directory: epath.Path, found: dict, wanted: dict) -> None:
    """Refuse in one sentence when what `directory` was prepared from is not what is asked."""
    if found["source"] != wanted["source"]:
        changed = sorted(
            k
            for k in {*found["source"], *wanted["source"]}
            if found["source"].get(k) != wanted["source"].get(k)
        )
        raise ValueError(
            f"{directory} ({kind}) was prepared from data.source={found['source']['source']} but "
            f"the config's source differs in {', '.join(changed)}; prepare into another "
            "data.prepared directory (or delete this one)."
        )
    if found["tokenizer"]["sha256"] != wanted["tokenizer"]["sha256"]:
        raise ValueError(
            f"{directory} ({kind}) was prepared with another tokenizer (sha256 "
            f"{found['tokenizer']['sha256'][:12]}, not {wanted['tokenizer']['sha256'][:12]}); "
            "prepare into another data.prepared directory (or delete this one)."
        )


def _tokenizer_for(
    directory: epath.Path,
    configured: str,
    vocab_size: int,
    model_type: str,
    train_texts: Sequence[str],
    process_count: int,
) -> TextTokenizer:
    """The configured tokenizer, else the one `directory` holds, else one trained into it."""
    if configured:
        tokenizer = load_tokenizer(configured)
    else:
        held = [directory / n for n in ("tokenizer.model", "tokenizer.json")]
        found = next((p for p in held if p.is_file()), None)
        if found is None and process_count > 1:
            raise ValueError(
                "A multi-host prepare needs one tokenizer for every host; set data.tokenizer "
                "(e.g. `lm tokenizer train` first)."
            )
        if found is None:
            with tempfile.TemporaryDirectory() as tmp:
                model = Path(tmp) / "tokenizer.model"
                sample = train_texts[:TOKENIZER_DOCUMENTS]
                train_tokenizer(sample, model, vocab_size, model_type)
                directory.mkdir(parents=True, exist_ok=True)
                epath.Path(model).copy(directory / "tokenizer.model", overwrite=True)
            found = directory / "tokenizer.model"
        tokenizer = load_tokenizer(found)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"Tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={vocab_size}; set model.vocab_size={tokenizer.vocab_size}."
        )
    return tokenizer


def _run(jobs: list[ShardJob], pool: ProcessPoolExecutor | None, log: Callable[[str], None]):
    """Write `jobs` over the `pool`'s processes, or in this one (spawned workers, not forked: a
    forked JAX process can deadlock, and each worker opens its own readers)."""
    results = pool.map(write_shard, jobs) if pool else map(write_shard, jobs)
    for done, (job, counts) in enumerate(zip(jobs, results, strict=True), start=1):
        log(f"  [{done}/{len(jobs)}] {job.split}/{counts['name']}: {counts['tokens']:,} tokens")


def prepare(
    spec: SourceSpec,
    directory: str | os.PathLike,
    tokenizer: str,
    vocab_size: int,
    tokenizer_type: str = "bpe",
    *,
    shards: int = 0,
    workers: int = 0,
    chunk_tokens: int = CHUNK_TOKENS,
    process_index: int = 0,
    process_count: int = 1,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Prepare `spec` into `directory` (local or gs://), or reuse what is there.

    `shards` 0 = `default_shards`; `workers` 0 = every CPU. With several processes (hosts),
    each writes the shards whose ordinal is its index modulo their count. Returns the manifest,
    or None while other processes' shards are still missing.
    """
    directory = epath.Path(os.path.expanduser(os.fspath(directory)))
    workers = workers or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1 and not (directory / MANIFEST).is_file():
            # Started first, so the workers' start-up overlaps reading the source here.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
            for _ in range(workers):
                pool.submit(_warm_up)
            # Interrupted: drop the queued shards rather than finishing them on the way out.
            stack.callback(pool.shutdown, wait=False, cancel_futures=True)
        return _prepare(
            spec,
            directory,
            tokenizer,
            vocab_size,
            tokenizer_type,
            shards,
            pool,
            workers if pool else 1,
            chunk_tokens,
            process_index,
            process_count,
            log,
        )


def _warm_up() -> None:
    """A first task for each worker: its imports happen while the parent reads the source."""


def _prepare(
    spec: SourceSpec,
    directory: epath.Path,
    tokenizer: str,
    vocab_size: int,
    tokenizer_type: str,
    shards: int,
    pool: ProcessPoolExecutor | None,
    workers: int,
    chunk_tokens: int,
    process_index: int,
    process_count: int,
    log: Callable[[str], None],
) -> dict | None:
    """`prepare` with its worker pool (None: write in this process)."""
    started = time.perf_counter()
    _OPENED.clear()  # a source or tokenizer file may have changed since an earlier call
    documents = source_documents(spec)
    identity = source_identity(spec, documents)
    manifest_path, plan_path = directory / MANIFEST, directory / PLAN
    if manifest_path.is_file() and not tokenizer:  # nothing to compare a tokenizer against
        manifest = json.loads(manifest_path.read_text())
        _check_same("finished", directory, manifest, {**manifest, "source": identity})
        log(f"{directory} already holds {spec.source}: nothing to do.")
        return manifest
    tok = _tokenizer_for(
        directory, tokenizer, vocab_size, tokenizer_type, documents["train"], process_count
    )
    wanted = {
        "format": FORMAT,
        "source": identity,
        "tokenizer": {"file": tok.file_name, "sha256": file_sha256(tok.path)},
        "chunk_tokens": chunk_tokens,
        "shards": {s: shards or default_shards(len(d)) for s, d in documents.items()},
    }
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        _check_same("finished", directory, manifest, wanted)
        log(f"{directory} already holds {spec.source} with this tokenizer: nothing to do.")
        return manifest
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        _check_same("unfinished", directory, plan, wanted)
        wanted = plan  # resume with the shard counts it started with
    else:
        directory.mkdir(parents=True, exist_ok=True)
        if process_index == 0:
            tok.save(directory)
            plan_path.write_text(json.dumps(wanted, indent=2))
    if not (directory / tok.file_name).is_file():
        tok.save(directory)
    tokenizer_file = str(directory / tok.file_name)

    jobs, ordinal = [], 0
    tfds = spec.source.startswith("tfds:")
    if tfds:  # this process's own shards read the source it opened
        _OPENED[("source", spec)] = documents
    for split, count in wanted["shards"].items():
        total = len(documents[split])
        for index in range(count):
            done = (directory / split / f"{shard_name(index, count)}.json").is_file()
            if ordinal % process_count == process_index and not done:
                start, stop = index * total // count, (index + 1) * total // count
                # Local text is in memory here already: hand workers their documents.
                texts = None if tfds else tuple(documents[split][start:stop])
                jobs.append(
                    ShardJob(
                        str(directory),
                        split,
                        index,
                        count,
                        start,
                        stop,
                        spec,
                        tokenizer_file,
                        wanted["chunk_tokens"],
                        texts,
                    )
                )
            ordinal += 1
    log(
        f"Preparing {spec.source} into {directory}: {len(jobs)} shard(s) to write, "
        f"{workers} worker process(es)."
    )
    _run(jobs, pool, log)
    return _finish(directory, wanted, time.perf_counter() - started, log)


def _finish(
    directory: epath.Path, plan: dict, seconds: float, log: Callable[[str], None]
) -> dict | None:
    """Write the manifest once every shard of every split is done."""
    splits = {}
    for split, count in plan["shards"].items():
        markers = [directory / split / f"{shard_name(i, count)}.json" for i in range(count)]
        if not all(m.is_file() for m in markers):
            log(
                "Other processes' shards are still missing; the last to finish writes the manifest."
            )
            return None
        shards = [json.loads(m.read_text()) for m in markers]
        splits[split] = {
            key: sum(s[key] for s in shards)
            for key in ("documents", "tokens", "bytes", "empty_documents")
        } | {"shards": shards}
    manifest = {k: plan[k] for k in ("format", "source", "tokenizer", "chunk_tokens")}
    manifest["splits"] = splits
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for split, entry in splits.items():
        log(
            f"{split}: {entry['documents']:,} documents, {entry['tokens']:,} tokens, "
            f"{entry['bytes']:,} bytes ({entry['bytes'] / max(entry['tokens'], 1):.2f} bytes/token)"
        )
    log(f"Prepared {directory} in {seconds:.1f} s.")
    return manifest
