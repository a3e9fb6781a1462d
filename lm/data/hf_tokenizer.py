"""Hugging Face `tokenizer.json` files through the `tokenizers` library (the `[hf]` extra).

`HfTokenizer` has the same interface as the SentencePiece `Tokenizer` (see
`lm.data.tokenizer.TextTokenizer`), so BERT WordPiece, GPT-2 byte-level BPE or Llama
vocabularies feed the same data code. Special tokens are named by a `special_tokens_map.json`
next to the file when there is one (as `save_pretrained` writes it), else recognised among
the file's special added tokens by their usual spellings.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from etils import epath

try:
    import tokenizers
except ImportError:  # the optional extra is missing
    tokenizers = None

# Usual spellings of each special token, most specific first.
_SPELLINGS = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "bos": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>"),
    "mask": ("[MASK]", "<mask>"),
    "sep": ("[SEP]", "<sep>"),
    "cls": ("[CLS]", "<cls>"),
}
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# Files beside tokenizer.json that name special tokens or hold the chat template; a run keeps them.
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # byte fallback (Llama's SentencePiece vocab)


class HfTokenizer:
    """A Hugging Face fast tokenizer file, without its padding, truncation or template."""

    file_name: ClassVar[str] = "tokenizer.json"

    def __init__(self, path: str | os.PathLike):
        if tokenizers is None:
            raise ImportError(
                f"Reading {path} needs the `tokenizers` library; install the extra: "
                "pip install 'lm[hf]'."
            )
        self.path = epath.Path(path)  # local or gs://
        text = self.path.read_text()
        self._tk = tokenizers.Tokenizer.from_str(text)
        # A saved tokenizer.json often pads/truncates to a fixed length; task code does both.
        self._tk.no_padding()
        self._tk.no_truncation()
        self._spec = json.loads(text)
        self._pieces: list[str] | None = None
        for role, token in self._special_tokens().items():
            setattr(self, role, None if token is None else self._tk.token_to_id(token))

    def _special_tokens(self) -> dict[str, str | None]:
        """{role: token text or None} for pad, unk, bos, eos, mask, sep, cls."""
        specials = {t.content for t in self._tk.get_added_tokens_decoder().values() if t.special}
        unk = (self._spec.get("model") or {}).get("unk_token")
        named = {
            role: next((s for s in spellings if s in specials), None)
            for role, spellings in _SPELLINGS.items()
        }
        named["unk"] = named["unk"] or unk
        # tokenizer_config.json names them as transformers reads them (a chat model's EOS is
        # often its end-of-turn token); special_tokens_map.json, when present, has the last word.
        for listed in (self.path.parent / TOKENIZER_CONFIG, self.path.parent / SPECIAL_TOKENS_MAP):
            if not listed.is_file():
                continue
            for key, value in json.loads(listed.read_text()).items():
                role = key.removesuffix("_token")
                if role in named and isinstance(value, str | dict):
                    named[role] = value if isinstance(value, str) else value.get("content")
        return named

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (the library encodes on all cores)."""
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(token ids of `text` without special tokens, each token's [start, end) characters)."""
        encoding = self._tk.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def special_token_texts(self) -> list[str]:
        """The text of every added token marked special (`<|im_end|>`, `</s>`, ...)."""
        return [t.content for t in self._tk.get_added_tokens_decoder().values() if t.special]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special tokens are dropped."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        """Copy tokenizer.json and the files beside it that name its special tokens or hold its
        chat template into the run directory `directory` (local or gs://)."""
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        beside = (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, CHAT_TEMPLATE)
        for src, dst in (
            (self.path, directory / self.file_name),
            *((self.path.parent / name, directory / name) for name in beside),
        ):
            if dst != src and src.is_file():
                src.copy(dst, overwrite=True)

    def pieces(self) -> list[str]:
        """Each id's token text as the vocabulary spells it (e.g. '##ing', 'Ġthe', '▁the')."""
        if self._pieces is None:
            self._pieces = [self._tk.id_to_token(i) or "" for i in range(self.vocab_size)]
        return self._pieces

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each token adds to decoded text (for bits-per-byte).

        Byte-level BPE tokens are one byte per character; WordPiece tokens add a space before
        a word-initial token (exact inside running text, one byte over at its start);
        SentencePiece-style '▁' counts as a space. Special tokens add nothing.
        """
        model = self._spec.get("model") or {}
        byte_level = "ByteLevel" in json.dumps(self._spec.get("decoder"))
        wordpiece = model.get("type") == "WordPiece"
        prefix = model.get("continuing_subword_prefix") if wordpiece else None
        special = {t.content for t in self._tk.get_added_tokens_decoder().values() if t.special}
        sizes = np.zeros(self.vocab_size, np.int32)
        for i, piece in enumerate(self.pieces()):
            if not piece or piece in special:
                continue
            if byte_level:
                sizes[i] = len(piece)
            elif _BYTE_PIECE.fullmatch(piece):
                sizes[i] = 1
            elif prefix is not None:
                continued = piece.startswith(prefix)
                sizes[i] = len(piece.removeprefix(prefix).encode()) + (not continued)
            else:
                sizes[i] = len(piece.replace("\u2581", " ").encode())
        return sizes


def wordpiece_tokenizer_json(vocab: str | Path, dst: str | Path, lowercase: bool = True) -> None:
    """Write `dst` (tokenizer.json) for a BERT WordPiece `vocab.txt` (BERT's normaliser and
    pre-tokenizer; `lowercase` as the model's do_lower_case)."""
    if tokenizers is None:
        raise ImportError(
            f"Building a tokenizer.json from {vocab} needs the `tokenizers` library; install "
            "the extra: pip install 'lm[hf]'."
        )
    # A submodule of the optional extra, checked for just above.
    from tokenizers.implementations import BertWordPieceTokenizer

    BertWordPieceTokenizer(str(vocab), lowercase=lowercase).save(str(dst))
