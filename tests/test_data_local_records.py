"""Local JSONL/CSV records and line/paragraph text units, cached as TFDS builds."""

import json
import logging
import re

import pytest

from lm.data.local_records import (
    canonical_json,
    local_records,
    require_columns,
)
from lm.data.sources import local_text_documents, split_units

ROWS = [{"text": f"review {i} ünï 😀", "label": str(i % 2)} for i in range(30)]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["text,label"] + [f'"{r["text"]}",{r["label"]}' for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _all(splits):
    return [*splits["train"], *splits["validation"]]


@pytest.mark.parametrize("writer, name", [(_write_jsonl, "r.jsonl"), (_write_csv, "r.csv")])
def test_records_read_back_whole_and_split_by_content(tmp_path, writer, name):
    writer(tmp_path / name, ROWS)
    splits = local_records(str(tmp_path / name), 0.2)
    assert sorted(map(canonical_json, _all(splits))) == sorted(map(canonical_json, ROWS))
    assert 1 <= len(splits["validation"]) < len(ROWS)


def test_jsonl_keeps_value_types_and_any_columns(tmp_path):
    rows = [{"a": 1, "b": [1.5, None], "c": {"d": True}}, {"other": "x"}]
    _write_jsonl(tmp_path / "r.jsonl", rows)
    splits = local_records(str(tmp_path / "r.jsonl"), 0.5)
    assert sorted(map(canonical_json, _all(splits))) == sorted(map(canonical_json, rows))


def test_split_depends_on_content_not_file_order(tmp_path):
    _write_jsonl(tmp_path / "forward.jsonl", ROWS)
    _write_jsonl(tmp_path / "backward.jsonl", ROWS[::-1])
    forward = local_records(str(tmp_path / "forward.jsonl"), 0.3)
    backward = local_records(str(tmp_path / "backward.jsonl"), 0.3)
    assert forward["train"] == backward["train"][::-1]
    assert forward["validation"] == backward["validation"][::-1]
    assert local_records(str(tmp_path / "forward.jsonl"), 0.3) == forward


def test_directory_and_glob_read_both_formats(tmp_path):
    _write_jsonl(tmp_path / "recs" / "a.jsonl", ROWS[:10])
    _write_csv(tmp_path / "recs" / "nested" / "b.csv", ROWS[10:])
    (tmp_path / "recs" / "notes.txt").write_text("ignored")
    by_dir = local_records(str(tmp_path / "recs"), 0.2)
    by_glob = local_records(str(tmp_path / "recs" / "**" / "*.*[lv]"), 0.2)
    assert by_dir == by_glob
    assert sorted(map(canonical_json, _all(by_dir))) == sorted(map(canonical_json, ROWS))


def test_csv_quoted_fields_may_span_lines_and_blank_lines_are_skipped(tmp_path):
    (tmp_path / "r.csv").write_text('text,label\n"two\nlines",1\n\n"a, b",0\n')
    records = _all(local_records(str(tmp_path / "r.csv"), 0.5))
    expected = [{"text": "two\nlines", "label": "1"}, {"text": "a, b", "label": "0"}]
    assert sorted(map(canonical_json, records)) == sorted(map(canonical_json, expected))


def test_missing_path_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nowhere" / "*.jsonl")
    message = (
        f"No .jsonl or .csv files match '{pattern}'; pass a file, a directory of them or a "
        "glob such as 'records/*.jsonl'."
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        local_records(pattern, 0.1)


def test_other_file_types_are_rejected(tmp_path):
    (tmp_path / "r.txt").write_text("x")
    message = f"{tmp_path / 'r.txt'} is neither a .jsonl nor a .csv file."
    with pytest.raises(ValueError, match=re.escape(message)):
        local_records(str(tmp_path / "r.txt"), 0.1)


def test_invalid_json_line_names_file_and_line(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"a": 1}\n\n{"a": \n')
    message = f"{tmp_path / 'r.jsonl'} line 3 is not valid JSON (Expecting value)."
    with pytest.raises(ValueError, match=re.escape(message)):
        local_records(str(tmp_path), 0.1)


def test_json_line_that_is_not_an_object_names_file_and_line(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    message = f"{tmp_path / 'r.jsonl'} line 2 is a JSON list, not an object."
    with pytest.raises(ValueError, match=re.escape(message)):
        local_records(str(tmp_path), 0.1)


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    (tmp_path / "r.csv").write_bytes(b"text\nok\nbad \xff\n")
    message = f"{tmp_path / 'r.csv'} is not valid UTF-8 (byte offset 12); re-encode it as UTF-8."
    with pytest.raises(ValueError, match=re.escape(message)):
        local_records(str(tmp_path), 0.1)


def test_csv_row_with_wrong_field_count_names_file_and_line(tmp_path):
    (tmp_path / "r.csv").write_text('text,label\n"multi\nline",1\nno label\n')
    message = f"{tmp_path / 'r.csv'} line 4 has 1 fields but the header has 2."
    with pytest.raises(ValueError, match=re.escape(message)):
        local_records(str(tmp_path), 0.1)


def test_csv_header_with_repeated_column_is_rejected(tmp_path):
    (tmp_path / "r.csv").write_text("text,text\na,b\n")
    message = f"{tmp_path / 'r.csv'} has a repeated column name in its header."
    with pytest.raises(ValueError, match=re.escape(message)):
        local_records(str(tmp_path), 0.1)


def test_files_without_records_are_rejected(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n\n")
    (tmp_path / "b.csv").write_text("text,label\n")
    message = f"The files matching '{tmp_path}' hold no records."
    with pytest.raises(ValueError, match=re.escape(message)):
        local_records(str(tmp_path), 0.1)


def test_require_columns_names_the_missing_column_and_the_available_ones():
    records = [{"text": "a", "label": "1"}, {"text": "b"}]
    require_columns(records[:1], ["text", "label"], "r.csv")
    require_columns([], ["anything"], "empty")
    message = "Column 'txt' is not in r.csv; available: label, text."
    with pytest.raises(ValueError, match=re.escape(message)):
        require_columns(records, ["txt"], "r.csv")
    message = "Record 1 of r.csv has no column 'label'."
    with pytest.raises(ValueError, match=re.escape(message)):
        require_columns(records, ["text", "label"], "r.csv")


def test_split_units_cut_lines_and_paragraphs_and_count_empty_ones():
    text = "\n\nfirst para\nstill first\n \t\n\n  second para\r\n\r\nthird\n\n"
    assert split_units(text, "file") == ([text], 0)
    assert split_units(" \n\n", "file") == ([], 1)
    lines = ["first para", "still first", "  second para", "third"]
    assert split_units(text, "line") == (lines, 6)
    paragraphs = ["first para\nstill first", "  second para", "third"]
    assert split_units(text, "paragraph") == (paragraphs, 2)
    with pytest.raises(ValueError, match=r"^Unknown unit 'page'; choose one of file, line, para"):
        split_units(text, "page")


def test_units_split_whole_files_and_log_skipped_empty_units(tmp_path, caplog):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"a{i}\n\nb{i}\nc{i}\n")
    by_file = local_text_documents(str(tmp_path), 0.3)
    with caplog.at_level(logging.WARNING, logger="lm.data.sources"):
        by_line = local_text_documents(str(tmp_path), 0.3, unit="line")
    assert f"Skipped 10 empty line(s) in data.source='{tmp_path}'." in caplog.messages
    by_paragraph = local_text_documents(str(tmp_path), 0.3, unit="paragraph")
    # The same files land in the same split whatever the unit.
    for split in ("train", "validation"):
        assert by_line[split] == [u for doc in by_file[split] for u in doc.split()]
        paragraphs = [u for doc in by_file[split] for u in doc.rstrip("\n").split("\n\n")]
        assert by_paragraph[split] == paragraphs
    assert len(by_line["train"]) + len(by_line["validation"]) == 30


def test_a_missing_column_is_named_by_file_and_line(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": "a"}) for i in range(30)]
    lines[20] = json.dumps({"text": "no label here"})  # file line 21
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    splits = local_records(str(path), 0.2)
    records = (
        splits["train"] if any("label" not in r for r in splits["train"]) else splits["validation"]
    )
    message = f"{path} line 21 has no column 'label'."
    with pytest.raises(ValueError, match=re.escape(message)):
        require_columns(records, ["text", "label"], str(path))


def test_csv_records_know_their_line(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('text,label\n"two\nlines",a\nplain,b\n')
    records = _all(local_records(str(path), 0.5))
    assert sorted(r.where for r in records) == [f"{path} line 2", f"{path} line 4"]
