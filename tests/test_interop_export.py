"""`lm convert to-hf` writes a whole Hugging Face model directory: generation_config.json, the
special ids, a tokenizer `AutoTokenizer` loads with our ids, and an imported model's own dropout
values; `transformers` then generates the greedy text `lm generate` does. `from-hf` records the
run's real run_dir."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import tiny_model  # noqa: E402
from hf_models import ENDOFTEXT, bpe_tokenizer_json, gpt2  # noqa: E402

from lm.cli import main  # noqa: E402
from lm.commands.finetune import finetune  # noqa: E402
from lm.commands.pretrain import pretrain  # noqa: E402
from lm.config import Config, DataConfig, load_config  # noqa: E402
from lm.data.tokenizer import NUM_RESERVED, load_tokenizer, train_tokenizer  # noqa: E402
from lm.interop.convert import from_hf, to_hf  # noqa: E402
from lm.model import Transformer  # noqa: E402
from lm.run_dir import write_params_run  # noqa: E402

WORDS = ["the", "king", "queen", "and", "of", "to", "my", "lord", "is", "what", "thou", "hath"]
VOCAB = 300
PROMPTS = ["the king", "my lord is", "what thou"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(200)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", VOCAB)


def _lm_greedy(run_dir, capsys) -> list[dict]:
    args = ["generate", "--run", str(run_dir), "--json", "--max-new-tokens", str(NEW_TOKENS)]
    capsys.readouterr()
    assert main(args + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _hf_greedy(directory) -> list[tuple[list[int], str]]:
    """transformers' greedy (new tokens up to EOS, their text) with the exported tokenizer and
    generation_config.json alone."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    out = []
    for prompt in PROMPTS:
        batch = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=NEW_TOKENS)[0, batch.input_ids.shape[1] :]
        tokens = [int(t) for t in ids]
        eos = model.generation_config.eos_token_id
        tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
        out.append((tokens, tokenizer.decode(ids, skip_special_tokens=True)))
    return out


def _assert_same_greedy(run_dir, exported, capsys) -> list[dict]:
    ours = _lm_greedy(run_dir, capsys)
    theirs = _hf_greedy(exported)
    assert [(r["tokens"], r["text"]) for r in ours] == theirs
    return ours


def test_exported_sentencepiece_run_generates_lm_generates_greedy_text(
    sentencepiece, tmp_path, capsys
):
    """A Llama-architecture run with a SentencePiece tokenizer: AutoTokenizer reads the same
    ids (BOS first), and transformers' greedy text equals `lm generate`'s."""
    m = tiny_model(vocab_size=VOCAB, max_seq_len=64, tie_embeddings=False)
    cfg = Config(model=m, data=DataConfig(seq_len=16))
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    params = jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), nnx.state(model)
    )
    # Logit 0 for the reserved ids (control, <mask>..., bytes): greedy picks word pieces, whose
    # text decodes alike everywhere (random bytes are invalid UTF-8, replaced differently).
    params["unembed"].set_value(params["unembed"][...].at[:NUM_RESERVED].set(0.0))
    run = tmp_path / "run"
    write_params_run(run, cfg, params, tokenizer=sentencepiece)
    assert to_hf(run, tmp_path / "hf") == "LlamaForCausalLM"
    hf = tmp_path / "hf"
    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    assert json.loads((hf / "generation_config.json").read_text()) == {**ids, "do_sample": False}
    assert ids.items() <= json.loads((hf / "config.json").read_text()).items()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    for text in ["the king hath", " my  lord\nis 42 wörld", "<mask> thou"]:
        assert tokenizer(text).input_ids == [2, *sentencepiece.encode(text)]
    ours = _assert_same_greedy(run, hf, capsys)
    assert len({r["text"] for r in ours}) == len(PROMPTS)  # not one degenerate continuation


def test_imported_gpt2_exports_its_tokenizer_dropout_and_ids_and_records_its_run_dir(tmp_path):
    root = tmp_path
    tokenizer_json = bpe_tokenizer_json(root / "hf", [" ".join(WORDS)] * 4, vocab_size=300)
    vocab = load_tokenizer(tokenizer_json).vocab_size
    dropout = {"resid_pdrop": 0.05, "embd_pdrop": 0.15, "attn_pdrop": 0.25}
    gpt2(vocab, bos_token_id=0, eos_token_id=0, **dropout).save_pretrained(root / "hf")
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    settings = {"chat_template": template, "eos_token": ENDOFTEXT}
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(settings))
    from_hf(root / "hf", root / "run")
    assert yaml.safe_load((root / "run" / "config.yaml").read_text())["train"]["run_dir"] == str(
        root / "run"
    )
    assert to_hf(root / "run", root / "out") == "GPT2LMHeadModel"
    config = json.loads((root / "out" / "config.json").read_text())
    assert dropout.items() <= config.items()  # not model.dropout=0 of the run
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)
    generation = json.loads((root / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "out")
    assert tokenizer.eos_token == ENDOFTEXT and tokenizer.model_max_length == 32
    ours = load_tokenizer(root / "run" / "tokenizer.json")
    text = "the queen and my lord"
    assert tokenizer(text, add_special_tokens=False).input_ids == ours.encode(text)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "my lord"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == f"user: hi{ENDOFTEXT}assistant: my lord{ENDOFTEXT}"


def test_a_fine_tune_of_an_imported_model_exports_the_imported_dropout(tmp_path):
    """The imported config.json is found through finetune.init_from."""
    gpt2(resid_pdrop=0.2, attn_pdrop=0.3).save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "base")
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    base_config = yaml.safe_load((tmp_path / "base" / "config.yaml").read_text())
    base_config["finetune"]["init_from"] = str(tmp_path / "base")
    (tuned / "config.yaml").write_text(yaml.safe_dump(base_config))
    (tuned / "checkpoints").symlink_to(tmp_path / "base" / "checkpoints")
    to_hf(tuned, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["resid_pdrop"], config["attn_pdrop"]) == (0.2, 0.3)
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()  # the run has none


@pytest.mark.slow  # pretrain, a text_to_text fine-tune, export, transformers
def test_a_fine_tuned_run_exported_generates_lm_generates_greedy_text(
    tiny_text_config, tmp_path, capsys
):
    """Its greedy answers stop at EOS in both (generation_config.json names it)."""
    model = dataclasses.replace(tiny_text_config.model, max_seq_len=64)  # room for the answers
    train = dataclasses.replace(tiny_text_config.train, sample_tokens=0)
    pretrain(dataclasses.replace(tiny_text_config, model=model, train=train))
    pretrained = tiny_text_config.train.run_dir
    rng = np.random.default_rng(0)
    records = [
        {"text": " ".join(rng.choice(WORDS, 3)), "label": " ".join(rng.choice(WORDS, 2))}
        for _ in range(48)
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    m = model
    cfg = load_config(
        None,
        [
            *(f"model.{k}={getattr(m, k)}" for k in ("vocab_size", "d_model", "num_layers")),
            *(f"model.{k}={getattr(m, k)}" for k in ("num_heads", "d_ff", "max_seq_len")),
            "data.seq_len=16",
            "data.batch_size=8",
            "finetune.task=text_to_text",
            f"finetune.dataset={data}",
            f"finetune.init_from={pretrained}",
            "finetune.max_new_tokens=2",
            "finetune.generate_examples=4",
            f"train.run_dir={tmp_path / 'tuned'}",
            "train.steps=40",
            "train.eval_every=40",
            "checkpoint.every=40",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
        ],
    )
    finetune(cfg)
    export = ["convert", "to-hf", "--run", str(tmp_path / "tuned"), "--dst", str(tmp_path / "hf")]
    assert main(export) == 0
    ours = _assert_same_greedy(tmp_path / "tuned", tmp_path / "hf", capsys)
    assert any(r["finish_reason"] == "eos" for r in ours)
