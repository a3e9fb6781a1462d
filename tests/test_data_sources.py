"""Local text becomes cached TFDS array_record builds, read back with random access."""

import pytest

from lm.data import sources
from lm.data.shakespeare import shakespeare_documents
from lm.data.sources import build_text_dataset, load_documents, local_text_documents

DOCS = {
    "train": ["first document\nwith two lines\n", "second: ünïcödé 漢字 😀", "  spaces  "],
    "validation": ["held out\n"],
}


@pytest.fixture
def generation_count(monkeypatch):
    """Counts how many splits the TFDS builder actually generates."""
    calls = []
    original = sources._TextBuilder._generate_examples

    def counting(self, docs):
        calls.append(len(docs))
        return original(self, docs)

    monkeypatch.setattr(sources._TextBuilder, "_generate_examples", counting)
    return calls


def test_build_reads_back_the_same_documents_in_order(tmp_path):
    splits = build_text_dataset(DOCS, tmp_path, "demo")
    assert {k: list(v) for k, v in splits.items()} == DOCS
    assert splits["train"][1] == DOCS["train"][1] and splits["train"][-1] == "  spaces  "
    assert splits["train"][0:2] == DOCS["train"][:2]
    with pytest.raises(IndexError):
        splits["train"][3]
    assert list(tmp_path.glob("lm_text/demo_*/1.0.0/*.array_record*"))


def test_same_content_is_reused_and_changed_content_rebuilds(tmp_path, generation_count):
    build_text_dataset(DOCS, tmp_path, "demo")
    assert len(generation_count) == 2
    again = build_text_dataset(DOCS, tmp_path, "demo")
    assert len(generation_count) == 2  # nothing regenerated
    assert list(again["validation"]) == DOCS["validation"]
    changed = {"train": DOCS["train"] + ["new"], "validation": DOCS["validation"]}
    rebuilt = build_text_dataset(changed, tmp_path, "demo")
    assert len(generation_count) == 4
    assert list(rebuilt["train"]) == changed["train"]
    assert len(list(tmp_path.glob("lm_text/demo_*"))) == 2


def test_empty_split_is_served_without_tfds(tmp_path):
    splits = build_text_dataset({"train": ["only"], "validation": []}, tmp_path, "x")
    assert list(splits["train"]) == ["only"] and len(splits["validation"]) == 0


def test_shakespeare_source_builds_both_splits(tmp_path):
    splits = load_documents("shakespeare", tmp_path, 0.05)
    assert list(splits["validation"]) == shakespeare_documents("validation")
    assert len(splits["train"]) == len(shakespeare_documents("train"))


def _write_corpus(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}\nline two of {i}\n")
    (folder / "notes.md").write_text("not a txt file")


def test_local_directory_glob_and_file(tmp_path):
    _write_corpus(tmp_path / "corpus", 20)
    by_dir = local_text_documents(str(tmp_path / "corpus"), 0.2)
    by_glob = local_text_documents(str(tmp_path / "corpus" / "*.txt"), 0.2)
    assert by_dir == by_glob
    everything = by_dir["train"] + by_dir["validation"]
    assert sorted(everything) == sorted(f"document {i}\nline two of {i}\n" for i in range(20))
    assert 1 <= len(by_dir["validation"]) < 20
    assert local_text_documents(str(tmp_path / "corpus"), 0.2) == by_dir  # deterministic
    single = local_text_documents(str(tmp_path / "corpus" / "doc03.txt"), 0.5)
    assert single == {"train": ["document 3\nline two of 3\n"], "validation": []}


def test_two_files_always_hold_one_out(tmp_path):
    _write_corpus(tmp_path / "two", 2)
    for fraction in (0.001, 0.999):
        split = local_text_documents(str(tmp_path / "two"), fraction)
        assert len(split["train"]) == 1 and len(split["validation"]) == 1


def test_local_source_through_load_documents(tmp_path):
    _write_corpus(tmp_path / "corpus", 5)
    splits = load_documents(str(tmp_path / "corpus"), str(tmp_path / "data"), 0.3)
    expected = local_text_documents(str(tmp_path / "corpus"), 0.3)
    assert {k: list(v) for k, v in splits.items()} == expected


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
    with pytest.raises(ValueError, match=r"bad\.txt is not valid UTF-8 \(byte offset 6\)"):
        local_text_documents(str(tmp_path), 0.1)


def test_missing_path_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nowhere" / "*.txt")
    with pytest.raises(FileNotFoundError, match=r"No text files match data\.source=.*nowhere"):
        local_text_documents(pattern, 0.1)


def test_files_without_text_are_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="hold no text"):
        local_text_documents(str(tmp_path), 0.1)
