"""`lm tokenizer train` writes a model that round-trips its corpus and reports bad input."""

import pytest

from lm.cli import main
from lm.data.tokenizer import UNK_ID, load_tokenizer

CORPUS = {
    "latin.txt": "The quick brown fox jumps over the lazy dog.\nFaçade, naïve, Straße.\n",
    "cyrillic.txt": "Съешь же ещё этих мягких французских булок, да выпей чаю.\n",
    "cjk.txt": "漢字とかな混じり文。中文简体。한국어 텍스트.\n",
    "emoji.txt": "emoji 😀🚀👍🏽 and flags 🇺🇳\n  indented, digits 1234567890\n",
}


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in CORPUS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_train_writes_a_model_that_round_trips_the_corpus_exactly(corpus_dir, tmp_path, capsys):
    output = tmp_path / "tok" / "multi.model"
    args = ["tokenizer", "train", "--input", str(corpus_dir), "--vocab-size", "400"]
    assert main([*args, "--output", str(output), "--validation-fraction", "0"]) == 0

    assert output.is_file()
    assert capsys.readouterr().out == (
        f"{output}: vocab_size=400 pad=0 unk=1 bos=2 eos=3 mask=4 sep=5 cls=6\n"
    )
    tokenizer = load_tokenizer(output)
    assert tokenizer.vocab_size == 400
    for text in CORPUS.values():
        ids = tokenizer.encode(text)
        assert UNK_ID not in ids
        assert tokenizer.decode(ids) == text


def test_train_on_a_glob_reads_only_the_matching_files(corpus_dir, tmp_path):
    (corpus_dir / "notes.md").write_text("ʘʘʘ not a .txt file\n", encoding="utf-8")
    output = tmp_path / "glob.model"
    args = ["tokenizer", "train", "--input", str(corpus_dir / "*.txt"), "--vocab-size", "400"]
    assert main([*args, "--output", str(output), "--validation-fraction", "0"]) == 0
    tokenizer = load_tokenizer(output)
    pieces = tokenizer.pieces()

    def is_byte_piece(i: int) -> bool:
        return pieces[i].startswith("<0x")

    # Characters seen in training get real pieces; one only in the .md file needs byte fallback.
    assert not any(is_byte_piece(i) for i in tokenizer.encode("ж"))
    assert all(is_byte_piece(i) for i in tokenizer.encode("ʘ"))


def test_missing_input_is_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    args = ["tokenizer", "train", "--input", str(missing), "--vocab-size", "400"]
    assert main([*args, "--output", str(tmp_path / "t.model")]) == 2
    assert capsys.readouterr().err == (
        f"lm tokenizer: error: No text files match data.source='{missing}'; pass a .txt file, "
        "a directory of .txt files or a glob such as 'corpus/*.txt'.\n"
    )
    assert not (tmp_path / "t.model").exists()


def test_bad_corpus_or_vocab_size_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    (tmp_path / "small.txt").write_text("abc\n")
    cases = {
        tmp_path / "bad.txt": f"{tmp_path / 'bad.txt'} is not valid UTF-8 (byte offset 3); "
        "re-encode it as UTF-8.",
        tmp_path / "small.txt": "vocab_size=100 is too small: this corpus needs at least 267 "
        "pieces (264 reserved + 3 distinct characters); set model.vocab_size >= 267.",
    }
    for path, message in cases.items():
        args = ["tokenizer", "train", "--input", str(path), "--vocab-size", "100"]
        assert main([*args, "--output", str(tmp_path / "t.model")]) == 2
        assert capsys.readouterr().err == f"lm tokenizer: error: {message}\n"


def test_validation_fraction_outside_unit_interval_is_rejected_by_the_parser(tmp_path, capsys):
    args = ["tokenizer", "train", "--input", "x", "--vocab-size", "400", "--output", "t.model"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--validation-fraction", "1"])
    assert exit_info.value.code == 2
    assert "argument --validation-fraction: must be in [0, 1), got 1" in capsys.readouterr().err
