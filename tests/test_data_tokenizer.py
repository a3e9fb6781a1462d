"""SentencePiece tokenizers round-trip any text exactly and count the bytes each piece covers."""

import numpy as np
import pytest

from lm.data.shakespeare import shakespeare_documents
from lm.data.tokenizer import (
    BOS_ID,
    CLS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    UNK_ID,
    load_tokenizer,
    train_tokenizer,
)

MULTILINGUAL = [
    "Plain ASCII, with  two spaces,\ttabs and trailing spaces   \n",
    "\n\nleading newlines and   \n  indented lines\n\n\n",
    "Ünïcödé Latin: façade, naïve, Straße, ØÆÅ.",
    "Кириллица: Съешь же ещё этих мягких французских булок.",
    "漢字とかな混じり文、中文简体、한국어 텍스트",
    "emoji 😀🚀👍🏽 and flags 🇺🇳, digits 1234567890, symbols <>&\"'{}",
    " starts with a space and ends with newline\n",
    "<mask> <sep> <cls> look like special pieces",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = shakespeare_documents("validation")[:15] + ["Кириллица и 漢字\nemoji 😀\n"]
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=400)


def test_special_ids_are_fixed(tokenizer):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID, CLS_ID) == (0, 1, 2, 3, 4, 5, 6)
    sp = tokenizer._sp
    pieces = [sp.id_to_piece(i) for i in range(8)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>", "<mask>", "<sep>", "<cls>", "\n"]
    assert tokenizer.vocab_size == 400
    assert tokenizer.encode("a\nb").count(7) == 1  # newline is one dedicated piece


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_multilingual_round_trip_and_token_bytes(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert UNK_ID not in ids  # byte fallback covers unseen characters
    assert int(tokenizer.token_bytes()[ids].sum()) == len(text.encode())


def test_encode_batch_matches_encode_and_decode_skips_control_ids(tokenizer):
    assert tokenizer.encode_batch(MULTILINGUAL) == [tokenizer.encode(t) for t in MULTILINGUAL]
    ids = tokenizer.encode("Good night, sweet prince.")
    assert tokenizer.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == "Good night, sweet prince."


def test_token_bytes_per_piece_kind(tokenizer):
    sizes = tokenizer.token_bytes()
    assert sizes.dtype == np.int32 and sizes.shape == (400,)
    assert sizes[[PAD_ID, UNK_ID, BOS_ID, EOS_ID]].tolist() == [0, 0, 0, 0]
    assert sizes[7] == 1  # "\n"
    assert (sizes[8:264] == 1).all()  # the 256 byte pieces
    space = tokenizer._sp.piece_to_id("\u2581")
    assert sizes[space] == 1


def test_load_tokenizer_reads_the_trained_model(tokenizer):
    loaded = load_tokenizer(tokenizer.path)
    text = MULTILINGUAL[3]
    assert loaded.encode(text) == tokenizer.encode(text)
    assert not list(tokenizer.path.parent.glob("tmp*"))  # the temporary training folder is gone


def test_vocab_too_small_names_the_minimum(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=270 is too small.*at least 2\d\d pieces"):
        train_tokenizer(["abcdefghijklmnopqrstuvwxyz " * 10], tmp_path / "t.model", 270)
    assert not (tmp_path / "t.model").exists()


def test_vocab_too_large_for_tiny_corpus(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=5000 is too large .* at most \d+ pieces"):
        train_tokenizer(["tiny corpus\n"], tmp_path / "t.model", 5000)
    assert not (tmp_path / "t.model").exists()


def test_empty_corpus_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", "\n\n"], tmp_path / "t.model", 400)


def test_missing_model_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model does not exist.*data\.tokenizer"):
        load_tokenizer(tmp_path / "nope.model")
