"""A GPT-2 imported from Hugging Face with its byte-level BPE tokenizer.json works end to end:
`lm generate` decodes the same greedy text as transformers' generate() (prompts led by
<|endoftext|>, stopping at it), and `lm evaluate` gives transformers' mean cross-entropy."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from hf_models import bpe_tokenizer_json, gpt2, randomize  # noqa: E402

from lm.cli import main  # noqa: E402
from lm.data.sources import local_text_documents  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold; all who wander are not lost.",
    "To be, or not to be: that is the question.",
]
PROMPTS = ["The quick brown", "A journey of", "All that"]
NEW_TOKENS = 12
EOS_FACTOR = 1.0  # the EOS row becomes this multiple of the most generated token's row


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(HF model, the tokenizers.Tokenizer, run dir) of a tiny random GPT-2 whose source
    directory holds a trained tokenizer.json, converted with `lm convert from-hf`."""
    root = tmp_path_factory.mktemp("gpt2")
    tokenizer_json = bpe_tokenizer_json(root / "hf", SENTENCES, vocab_size=300)
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    eos = tokenizer.token_to_id("<|endoftext|>")
    hf = randomize(gpt2(tokenizer.get_vocab_size(), bos_token_id=eos, eos_token_id=eos), scale=0.3)
    # EOS (tied: also the BOS input row) competes with the token greedy decoding emits most.
    common = np.bincount(sum(_hf_greedy(hf, tokenizer, PROMPTS), [])).argmax()
    with torch.no_grad():
        head = hf.get_output_embeddings().weight
        head[eos] = head[common] * EOS_FACTOR
    hf.save_pretrained(root / "hf")
    assert main(["convert", "from-hf", "--src", str(root / "hf"), "--dst", str(root / "run")]) == 0
    return hf, tokenizer, root / "run"


def _ids(tokenizer, text: str) -> list[int]:
    """`text`'s token ids led by <|endoftext|>, GPT-2's BOS."""
    bos = tokenizer.token_to_id("<|endoftext|>")
    return [bos, *tokenizer.encode(text, add_special_tokens=False).ids]


def _hf_greedy(hf, tokenizer, prompts) -> list[list[int]]:
    """transformers' greedy new tokens per prompt, up to and including the first EOS."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    rows = []
    for prompt in prompts:
        ids = torch.tensor([_ids(tokenizer, prompt)])
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        row = [int(t) for t in out[0, ids.shape[1] :]]
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_lm_generate_text_equals_transformers_greedy_and_stops_at_endoftext(imported, capsys):
    hf, tokenizer, run_dir = imported
    eos = tokenizer.token_to_id("<|endoftext|>")
    expected = _hf_greedy(hf, tokenizer, PROMPTS)
    args = ["generate", "--run", str(run_dir), "--json", "--max-new-tokens", str(NEW_TOKENS)]
    capsys.readouterr()
    assert main(args + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for record, tokens in zip(records, expected, strict=True):
        ended = tokens[-1:] == [eos]
        assert record["tokens"] == (tokens[:-1] if ended else tokens)
        assert record["finish_reason"] == ("eos" if ended else "length")
        assert record["text"] == tokenizer.decode(tokens, skip_special_tokens=True)
    # The stop is exercised: EOS fires before the token limit for some prompt, not for all.
    assert {r["finish_reason"] for r in records} == {"eos", "length"}


def test_lm_evaluate_loss_equals_transformers_cross_entropy(imported, tmp_path, capsys):
    """Every token after the leading <|endoftext|> is scored once, given all before it."""
    hf, tokenizer, run_dir = imported
    text_file = tmp_path / "text.txt"
    text_file.write_text("The lazy fox wanders;\nnot all gold glitters.\n")
    [document] = local_text_documents(str(text_file), 0.5, "file")["train"]
    ids = torch.tensor([_ids(tokenizer, document)])
    with torch.no_grad():
        logits = hf(ids).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    overrides = [
        f"data.source={text_file}",
        f"data.data_dir={tmp_path / 'tfds'}",
        "data.text_unit=file",
        "data.validation_fraction=0.5",  # one file: always in train
        "data.packing=truncate",
    ]
    output = tmp_path / "report.json"
    args = ["evaluate", "--run", str(run_dir), "--split", "train", "--output", str(output)]
    assert main(args + overrides) == 0
    metrics = json.loads(output.read_text())["metrics"]
    assert metrics["tokens"] == ids.shape[1] - 1 < 32  # one untruncated row
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
