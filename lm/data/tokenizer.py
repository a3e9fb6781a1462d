"""Tokenizers: SentencePiece models trained here (round-trip any UTF-8 text exactly), and
Hugging Face `tokenizer.json` files (`lm.data.hf_tokenizer`), behind one interface.

Every tokenizer has encode/encode_batch/decode/pieces/token_bytes/vocab_size, its file `path`,
the `file_name` a run directory stores it under (`save` copies it there), and the special ids
`pad`, `bos`, `eos`, `unk`, `mask`, `sep`, `cls` (None where the vocabulary has no such token).

Ids 0-6 are fixed for every model trained here, so objectives can name them without a
tokenizer at hand: pad, unk, bos, eos (control pieces) and `<mask>`, `<sep>`, `<cls>`
(user-defined pieces). A `\\n` piece follows them: training sentences are single lines, so
without it every newline would cost a byte-fallback token.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import sentencepiece as spm
from etils import epath

from lm.data.hf_tokenizer import HfTokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_ID, SEP_ID, CLS_ID = 4, 5, 6
USER_SYMBOLS = ("<mask>", "<sep>", "<cls>", "\n")
# Byte fallback needs all 256 byte pieces next to the control and user-defined ones.
NUM_RESERVED = 4 + len(USER_SYMBOLS) + 256


# The files a run directory may hold its tokenizer in, in order of preference.
RUN_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


class TextTokenizer(Protocol):
    """What the data, fine-tuning and generation code needs from a tokenizer."""

    path: epath.Path  # local or gs://
    file_name: ClassVar[str]
    pad: int | None
    bos: int | None
    eos: int | None
    unk: int | None
    mask: int | None
    sep: int | None
    cls: int | None

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def pieces(self) -> list[str]: ...
    def token_bytes(self) -> np.ndarray: ...
    def save(self, directory: str | os.PathLike) -> None: ...


class Tokenizer:
    """A loaded SentencePiece model with batch encoding and per-piece byte lengths."""

    file_name: ClassVar[str] = "tokenizer.model"

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)  # local or gs://
        self._sp = spm.SentencePieceProcessor(model_proto=self.path.read_bytes())
        self._pieces: list[str] | None = None
        self.pad = _present(self._sp.pad_id())
        self.unk = _present(self._sp.unk_id())
        self.bos = _present(self._sp.bos_id())
        self.eos = _present(self._sp.eos_id())
        self.mask, self.sep, self.cls = (self._piece_id(p) for p in USER_SYMBOLS[:3])

    def _piece_id(self, piece: str) -> int | None:
        """The id of user-defined `piece`, or None when the model lacks it."""
        i = self._sp.piece_to_id(piece)  # the unknown id when absent
        return i if self._sp.id_to_piece(i) == piece else None

    @property
    def vocab_size(self) -> int:
        """Number of pieces, including the reserved ones."""
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded on all CPU cores."""
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; pad, bos and eos are dropped."""
        dropped = (self.pad, self.bos, self.eos)
        return self._sp.decode([int(i) for i in ids if i not in dropped])

    def save(self, directory: str | os.PathLike) -> None:
        """Copy the model into the run directory `directory` (local or gs://)."""
        epath.Path(directory).mkdir(parents=True, exist_ok=True)
        dst = epath.Path(directory) / self.file_name
        if dst != self.path:
            self.path.copy(dst, overwrite=True)

    def pieces(self) -> list[str]:
        """Each id's piece text, e.g. '\u2581the' ('\u2581' marks a leading space); read once."""
        if self._pieces is None:
            self._pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        return self._pieces

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each piece adds to decoded text (for bits-per-byte)."""
        sizes = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self._sp.is_byte(i):
                sizes[i] = 1
            elif not (self._sp.is_control(i) or self._sp.is_unknown(i)):
                sizes[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode())
        return sizes


def _present(i: int) -> int | None:
    return i if i >= 0 else None  # SentencePiece reports an absent special token as -1


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load a SentencePiece `.model` (e.g. from `train_tokenizer`) or a Hugging Face
    `tokenizer.json` (needs the `[hf]` extra), local or gs://."""
    path = epath.Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise FileNotFoundError(
            f"Tokenizer model {path} does not exist; set data.tokenizer to an existing "
            "SentencePiece .model or tokenizer.json, or leave it empty to train one into the "
            "run directory."
        )
    if path.suffix == ".json":
        return HfTokenizer(path)
    return Tokenizer(path)


def pad_id(tokenizer: TextTokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else 0 (any id works: padding
    carries no loss and is masked from attention; GPT-2 and Llama have no pad token)."""
    return PAD_ID if tokenizer.pad is None else tokenizer.pad


def run_tokenizer_file(run_dir: str | os.PathLike) -> epath.Path | None:
    """The tokenizer file a run directory (local or gs://) holds, tokenizer.model first."""
    for name in RUN_TOKENIZER_FILES:
        if (epath.Path(run_dir) / name).is_file():
            return epath.Path(run_dir) / name
    return None


def existing_tokenizer(
    run_dir: str | os.PathLike,
    configured: str = "",
    inherited: TextTokenizer | None = None,
) -> TextTokenizer | None:
    """A run's tokenizer if it has one: the file in `run_dir` (local or gs://; kept on resume),
    else `inherited` (e.g. the `init_from` run's), else the `configured` path, else None."""
    own = run_tokenizer_file(run_dir)
    if own is not None:
        return load_tokenizer(own)
    if inherited is not None:
        return inherited
    return load_tokenizer(configured) if configured else None


def resolve_tokenizer(
    run_dir: str | os.PathLike,
    configured: str,
    vocab_size: int,
    model_type: str,
    train_texts: Iterable[str],
    inherited: TextTokenizer | None = None,
) -> TextTokenizer:
    """`existing_tokenizer`, else a new one trained on `train_texts` into `run_dir` (local or
    gs://); its vocabulary must be the model's `vocab_size`."""
    tokenizer = existing_tokenizer(run_dir, configured, inherited)
    if tokenizer is None:
        run_dir = epath.Path(run_dir)
        # SentencePiece writes local files only: train in a local folder, keep it in the run.
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "tokenizer.model"
            train_tokenizer(train_texts, model, vocab_size, model_type)
            run_dir.mkdir(parents=True, exist_ok=True)
            epath.Path(model).copy(run_dir / "tokenizer.model", overwrite=True)
        tokenizer = load_tokenizer(run_dir / "tokenizer.model")
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"Tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={vocab_size}; set model.vocab_size={tokenizer.vocab_size}."
        )
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], model_path: str | Path, vocab_size: int, model_type: str = "bpe"
) -> Tokenizer:
    """Train a byte-fallback SentencePiece model on `texts` and write it to `model_path`."""
    # SentencePiece learns from sentences, not whole documents: feed it lines (newlines are
    # the user-defined `\n` piece, so they never need to be learnt).
    lines = [line for text in texts for line in text.split("\n") if line]
    if not lines:
        raise ValueError("Cannot train a tokenizer on an empty corpus; pass some text.")
    chars = set("".join(lines)) - set(USER_SYMBOLS)
    minimum = NUM_RESERVED + len(chars)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: this corpus needs at least {minimum} pieces "
            f"({NUM_RESERVED} reserved + {len(chars)} distinct characters); set "
            f"model.vocab_size >= {minimum}."
        )
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        prefix = Path(tmp) / "spm"
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                # Exact round trip: no normalisation, every space kept, bytes for unseen characters.
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                add_dummy_prefix=False,
                byte_fallback=True,
                character_coverage=1.0,
                split_digits=True,
                max_sentence_length=1 << 20,
                num_threads=os.cpu_count() or 1,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                user_defined_symbols=list(USER_SYMBOLS),
                minloglevel=2,
            )
        except RuntimeError as e:
            too_high = re.search(r"Vocabulary size too high .*<= (\d+)", str(e))
            if not too_high:
                raise
            raise ValueError(
                f"vocab_size={vocab_size} is too large for this corpus: it yields at most "
                f"{too_high.group(1)} pieces; lower model.vocab_size or train on more text."
            ) from None
        # Rename within one file system: a crash leaves the old model or none, never half of one.
        os.replace(f"{prefix}.model", model_path)
    return Tokenizer(model_path)
