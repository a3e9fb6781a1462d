"""Chat SFT: rendering as `apply_chat_template`, assistant-only weights, packing, `lm chat`."""

import dataclasses
import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tokenizers
from conftest import subprocess_env, tiny_model
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

from lm.cli import main
from lm.commands.chat import ChatSession
from lm.config import Config, ConfigError, load_config
from lm.data.chat_template import (
    BuiltinTemplate,
    JinjaTemplate,
    chat_template,
    conversation_of,
)
from lm.data.local_records import local_records
from lm.data.tokenizer import load_tokenizer, train_tokenizer
from lm.inference.generator import Generator
from lm.model import Transformer
from lm.run_dir import write_params_run
from lm.tasks import task_named
from lm.tasks.chat import encode_chats, pack_rows
from lm.train.objectives import TokenCrossEntropy

SPECIAL = [
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# ChatML (Qwen) and Llama 3 with `{% generation %}` markers, so transformers can report the
# assistant tokens; Mistral-style without them (its spans are checked by rendering prefixes).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
)
TEMPLATES = {"chatml": (CHATML, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>")}
TEMPLATES["mistral"] = (MISTRAL, "</s>")
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And how are you?"},
        {"role": "assistant", "content": "I am fine, thank you."},
    ],
    [
        {"role": "user", "content": "  spaces around  "},
        {"role": "assistant", "content": " Two\nlines, ünïcode ✓ "},
        {"role": "user", "content": "thank you"},
        {"role": "assistant", "content": "What is"},
    ],
]
WORDS = ["the", "king", "queen", "and", "of", "to", "my", "lord", "is", "what", "thou"]
VOCAB = 330


def _hf_tokenizer_dir(root, template: str, eos: str):
    """A byte-level BPE tokenizer.json and a tokenizer_config.json holding `template`."""
    root.mkdir()
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant"]
    tk.train_from_iterator(texts * 20, trainer)
    tk.save(str(root / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": eos,
        "pad_token": "<pad>",
        "chat_template": template,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module", params=list(TEMPLATES))
def hf_pair(request, tmp_path_factory):
    """(our tokenizer + template, transformers' tokenizer) of one template's directory."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: nothing to fetch
    template, eos = TEMPLATES[request.param]
    folder = _hf_tokenizer_dir(tmp_path_factory.mktemp("hf") / request.param, template, eos)
    ours = load_tokenizer(folder / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    return request.param, ours, chat_template(ours), theirs


def _prefix_mask(theirs, messages) -> list[int]:
    """The assistant-token mask from transformers' own renderings of each turn's prefix."""
    full = theirs.apply_chat_template(messages, tokenize=True, return_dict=False)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = theirs.apply_chat_template(
                messages[:i], tokenize=True, return_dict=False, add_generation_prompt=True
            )
            through = theirs.apply_chat_template(
                messages[: i + 1], tokenize=True, return_dict=False
            )
            assert full[: len(through)] == through  # the template renders prefixes stably
            mask[len(before) : len(through)] = [1] * (len(through) - len(before))
    return mask


def test_jinja_rendering_matches_apply_chat_template_ids_and_assistant_spans(hf_pair):
    name, ours, template, theirs = hf_pair
    assert isinstance(template, JinjaTemplate)
    assert ours.eos == theirs.eos_token_id  # tokenizer_config.json names the end-of-turn EOS
    for messages in CONVERSATIONS:
        rendered = template.render(messages)
        out = theirs.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            **({"return_assistant_tokens_mask": True} if name != "mistral" else {}),
        )
        assert rendered.ids == out["input_ids"]
        if name == "mistral":  # no generation markers: the spans rendered prefix by prefix
            assert rendered.mask == _prefix_mask(theirs, messages)
        else:
            assert rendered.mask == out["assistant_masks"]
        assert sum(rendered.mask) > 0
        # Every assistant turn is learnt, and it ends with the end-of-turn token.
        learnt = [i for i, m in enumerate(rendered.mask) if m]
        assert rendered.ids[learnt[-1]] == ours.eos
        turns = sum(m["role"] == "assistant" for m in messages)
        assert sum(ours.eos == rendered.ids[i] for i in learnt) == turns


def test_turn_end_token_is_found_and_the_template_travels_with_the_run(hf_pair, tmp_path):
    name, ours, template, _ = hf_pair
    assert template.turn_end() == TEMPLATES[name][1]
    ours.save(tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer_config.json").is_file()
    saved = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert chat_template(saved).render(CONVERSATIONS[1]) == template.render(CONVERSATIONS[1])
    # A chat_template.jinja beside tokenizer.json wins over tokenizer_config.json's.
    (tmp_path / "run" / "chat_template.jinja").write_text(CHATML)
    assert chat_template(saved).turn_end() == "<|im_end|>"


def test_generation_prompt_ids_match_apply_chat_template(hf_pair):
    _, _, template, theirs = hf_pair
    for messages in CONVERSATIONS:
        question = messages[:-1]
        expected = theirs.apply_chat_template(
            question, tokenize=True, return_dict=False, add_generation_prompt=True
        )
        assert template.prompt(question) == expected


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 8)) for _ in range(200)]
    texts += [BuiltinTemplate.text(c) for c in CONVERSATIONS] * 5
    return train_tokenizer(texts, tmp_path_factory.mktemp("sp") / "t.model", VOCAB)


def test_builtin_template_learns_each_assistant_content_and_its_eos_only(sp_tokenizer):
    template = chat_template(sp_tokenizer)
    assert isinstance(template, BuiltinTemplate)
    messages = CONVERSATIONS[1]
    rendered = template.render(messages)
    assert rendered.ids[0] == sp_tokenizer.bos and len(rendered.ids) == len(rendered.mask)
    learnt = [t for t, m in zip(rendered.ids, rendered.mask, strict=True) if m]
    expected = [*sp_tokenizer.encode("Paris."), sp_tokenizer.eos]
    expected += [*sp_tokenizer.encode("I am fine, thank you."), sp_tokenizer.eos]
    assert learnt == expected
    assert sp_tokenizer.decode(rendered.ids) == BuiltinTemplate.text(messages)
    # The prompt of the last answer is the rendering up to it, plus the assistant label.
    prompt = template.prompt(messages[:-1])
    assert rendered.ids[: len(prompt)] == prompt
    assert sp_tokenizer.decode(prompt).endswith("User: And how are you?\nAssistant: ")


def test_records_without_messages_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"messages": CONVERSATIONS[0]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"text": "hi"}) + "\n")
    [record, bad] = local_records(str(path), 0.0)["train"]
    task = task_named("chat")
    assert task.example(None, record, 0) == (CONVERSATIONS[0], "Hi.")
    with pytest.raises(ValueError, match=rf"{path} line 2 has neither 'messages'"):
        task.example(None, bad, 1)
    for messages, problem in [
        ([], "non-empty list"),
        ([{"role": "bot", "content": "x"}], "message 0 is not"),
        ([{"role": "user", "content": "x"}], "no assistant message"),
    ]:
        with pytest.raises(ValueError, match=problem):
            conversation_of({"messages": messages}, "chats.jsonl line 7")


def test_prompt_completion_records_become_user_and_assistant_turns():
    record = {"prompt": "2+2?", "completion": "4"}
    assert conversation_of(record, "r") == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    listed = {"prompt": CONVERSATIONS[1][:2], "completion": CONVERSATIONS[1][2:3]}
    assert conversation_of(listed, "r") == CONVERSATIONS[1][:3]


def test_best_fit_packing_fills_rows_and_keeps_item_order():
    lengths = [9, 2, 7, 3, 1, 8]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3 and all(r == sorted(r) for r in rows)
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_packed_rows_restart_positions_keep_weights_and_report_padding(sp_tokenizer):
    rendered = chat_template(sp_tokenizer).render_all(CONVERSATIONS * 4)
    seq_len = 64
    packed, stats = encode_chats(rendered, seq_len, 0, packing=True)
    single, single_stats = encode_chats(rendered, seq_len, 0, packing=False)
    assert len(packed["inputs"]) < len(single["inputs"]) == len(rendered)
    assert stats.rows == len(packed["inputs"]) and single_stats.rows == 0
    assert stats.real_tokens == single_stats.real_tokens == int((single["segment_ids"] > 0).sum())
    assert packed["weights"].sum() == single["weights"].sum()
    for row in range(len(packed["inputs"])):
        seg, pos = packed["segment_ids"][row], packed["positions"][row]
        for s in range(1, seg.max() + 1):
            assert list(pos[seg == s]) == list(range((seg == s).sum()))  # positions restart
        assert (packed["weights"][row][seg == 0] == 0).all()
    # One sentence says what packing saved.
    from lm.data.task_data import stats_line

    line = stats_line("train", stats, seq_len)
    assert f"packed into {stats.rows} rows, padding" in line


def test_packed_conversations_do_not_see_each_other_loss_equals_unpacked(sp_tokenizer):
    rendered = chat_template(sp_tokenizer).render_all(CONVERSATIONS * 2)
    packed, _ = encode_chats(rendered, 64, 0, packing=True)
    single, _ = encode_chats(rendered, 64, 0, packing=False)
    with nnx.use_eager_sharding(False):
        model = Transformer(tiny_model(vocab_size=VOCAB, max_seq_len=64), rngs=nnx.Rngs(0))
    objective = TokenCrossEntropy()

    @jax.jit
    def sums(batch):
        _, metrics = objective.loss(model, batch)
        return metrics["nll_sum"].sum(), metrics["weight_sum"].sum()

    assert packed["segment_ids"].max() > 1  # rows do hold several conversations
    nll_packed, w_packed = sums(packed)
    nll_single, w_single = sums(single)
    assert w_packed == w_single
    np.testing.assert_allclose(nll_packed, nll_single, rtol=2e-5)


def test_long_conversations_keep_their_start_and_count_cut_answer_tokens(sp_tokenizer):
    [rendered] = chat_template(sp_tokenizer).render_all([CONVERSATIONS[1]])
    arrays, stats = encode_chats([rendered], 12, 0, packing=False)
    assert list(arrays["inputs"][0]) == rendered.ids[:12]
    assert stats.truncated == 1 and stats.dropped_tokens == len(rendered.ids) - 13
    assert stats.dropped_target_tokens == sum(rendered.mask[13:])


def _chat_run(tmp_path, tokenizer) -> str:
    cfg = Config()
    cfg.model = tiny_model(vocab_size=VOCAB, max_seq_len=64)
    cfg.data = dataclasses.replace(cfg.data, seq_len=64)
    run_dir = tmp_path / "run"
    with nnx.use_eager_sharding(False):
        write_params_run(run_dir, cfg, nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0))))
    (run_dir / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    return str(run_dir)


def test_chat_cli_streams_replies_resets_and_exits_on_piped_input(
    tmp_path, sp_tokenizer, capsys, monkeypatch
):
    run_dir = _chat_run(tmp_path, sp_tokenizer)
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("the king\nmy lord\n/reset\n/what\nthou\n/exit\nx\n")
    )
    assert main(["chat", "--run", run_dir, "--max-new-tokens", "4", "--system", "Be brief."]) == 0
    out = capsys.readouterr()
    assert out.out.count("assistant> ") == 3  # "x" after /exit is never answered
    assert "[conversation cleared]" in out.out and "[unknown command /what" in out.out
    assert out.err.count(" tokens in ") == 3
    assert main(["chat", "--run", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_chat_history_keeps_whole_turns_within_the_context(tmp_path, sp_tokenizer):
    generator = Generator.from_run(_chat_run(tmp_path, sp_tokenizer))
    session = ChatSession(generator, chat_template(sp_tokenizer), max_new_tokens=8)
    dropped = [session.reply(" ".join(["the king"] * 5))[1] for _ in range(4)]
    assert dropped[0] == 0 and sum(dropped) > 0
    assert session.history[0]["role"] == "user" and len(session.history) % 2 == 0
    assert len(session.template.prompt(session.history[:-1])) <= 64 - 8
    with pytest.raises(ValueError, match="max-new-tokens"):
        ChatSession(generator, chat_template(sp_tokenizer), max_new_tokens=64)


def test_shakespeare_chat_demo_is_three_named_speakers_per_conversation():
    from lm.data.finetune_demos import CHAT_SYSTEM, DEMOS

    splits, _ = DEMOS["shakespeare_chat"]["chat"]()
    conversations, answers = splits["validation"]
    assert 0.05 < len(conversations) / len(splits["train"][0]) < 0.2
    for messages, answer in zip(conversations[:50], answers, strict=False):
        assert messages[0] == {"role": "system", "content": CHAT_SYSTEM}
        assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 3
        assert answer == messages[-1]["content"] and answer.strip()


def test_chat_task_rejects_a_head_only_finetune():
    cfg = load_config(None, ["finetune.task=chat", "finetune.trainable=head"])
    with pytest.raises(ConfigError, match="trainable=head"):
        task_named("chat").check(cfg.finetune)


def _chat_records(path, count: int = 48) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        words = " ".join(rng.choice(WORDS, 4))
        if i % 3:
            messages = [
                {"role": "user", "content": words},
                {"role": "assistant", "content": words.split()[0]},
                {"role": "user", "content": "and then?"},
                {"role": "assistant", "content": words.split()[-1]},
            ]
            lines.append({"messages": messages})
        else:
            lines.append({"prompt": words, "completion": words.split()[0]})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def _finetune_args(tmp_path, records, tokenizer, *overrides) -> list[str]:
    return [
        "finetune",
        f"model.vocab_size={VOCAB}",
        "model.d_model=32",
        "model.num_layers=2",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.d_ff=64",
        "model.max_seq_len=64",
        "data.seq_len=48",
        "data.batch_size=8",
        "data.validation_fraction=0.25",
        f"data.tokenizer={tokenizer.path}",
        "finetune.task=chat",
        f"finetune.dataset={records}",
        "finetune.max_new_tokens=4",
        "finetune.generate_examples=4",
        f"train.run_dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.eval_every=2",
        "checkpoint.every=2",
        *overrides,
    ]


@pytest.mark.slow  # a whole SFT run with greedy decoding
@pytest.mark.parametrize("template", ["builtin", "chatml"])
def test_chat_finetune_trains_packed_rows_and_scores_last_answers(
    tmp_path, sp_tokenizer, capsys, template
):
    records = tmp_path / "chats.jsonl"
    _chat_records(records)
    tokenizer, vocab = sp_tokenizer, VOCAB
    if template == "chatml":  # a tokenizer.json with its Jinja template and <|im_end|> as EOS
        tokenizer = load_tokenizer(
            _hf_tokenizer_dir(tmp_path / "hf", CHATML, "<|im_end|>") / "tokenizer.json"
        )
        vocab = tokenizer.vocab_size
    args = _finetune_args(tmp_path, records, tokenizer, f"model.vocab_size={vocab}")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "packed into" in out and "padding" in out
    final = json.loads((tmp_path / "run" / "final_eval.json").read_text())
    assert {"validation/loss", "validation/exact_match", "validation/token_f1"} <= final.keys()
    assert 0.0 <= final["validation/token_f1"] <= 1.0
    saved = load_tokenizer(tmp_path / "run" / tokenizer.file_name)
    assert type(chat_template(saved)) is type(chat_template(tokenizer))  # the run keeps it


def test_chat_finetune_names_a_bad_record_by_file_and_line(tmp_path, sp_tokenizer, capsys):
    records = tmp_path / "chats.jsonl"
    _chat_records(records, 4)
    with records.open("a") as f:
        f.write(json.dumps({"text": "no messages"}) + "\n")
    assert main(_finetune_args(tmp_path, records, sp_tokenizer)) == 2
    err = capsys.readouterr().err
    assert f"{records} line 5 has neither 'messages'" in err and err.count("\n") == 1


def _read_until(fd: int, marker: bytes, timeout: float = 120.0) -> bytes:
    """Bytes from a pseudo-terminal up to and including `marker`."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError(f"no {marker!r} from the terminal; got {seen[-300:]!r}")
        seen += os.read(fd, 4096)
    return seen


@pytest.mark.slow  # a subprocess importing JAX
def test_chat_in_a_pseudo_terminal_prompts_answers_and_exits(tmp_path, sp_tokenizer):
    run_dir = _chat_run(tmp_path, sp_tokenizer)
    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "lm.cli", "chat", "--run", run_dir, "--max-new-tokens", "3"]
    process = subprocess.Popen(
        command, stdin=follower, stdout=follower, stderr=follower, env=subprocess_env()
    )
    os.close(follower)
    try:
        assert b"/reset clears" in _read_until(leader, b"you> ")
        os.write(leader, b"the king\n")
        assert b"assistant> " in _read_until(leader, b"you> ")
        os.write(leader, b"/reset\n")
        assert b"[conversation cleared]" in _read_until(leader, b"you> ")
        os.write(leader, b"/exit\n")
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(leader)


def test_exported_chat_model_answers_as_lm_chat_does_under_transformers(tmp_path):
    """A run with a ChatML tokenizer.json exported by `to-hf`: transformers renders the
    conversation with the exported template to the same ids, and its greedy answer (to the
    template's end-of-turn EOS) is the one `lm chat` gives."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lm.interop.convert import to_hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(
        _hf_tokenizer_dir(tmp_path / "tok", CHATML, "<|im_end|>") / "tokenizer.json"
    )
    cfg = Config()
    cfg.model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=64, tie_embeddings=False)
    cfg.data = dataclasses.replace(cfg.data, seq_len=64)
    with nnx.use_eager_sharding(False):
        params = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), params)
    write_params_run(tmp_path / "run", cfg, params, tokenizer=tokenizer)
    to_hf(tmp_path / "run", tmp_path / "hf")

    session = ChatSession(
        Generator.from_run(tmp_path / "run"), chat_template(tokenizer), max_new_tokens=12
    )
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    for text in ["the king", "what is my lord"]:
        done, _ = session.reply(text)
        ids = theirs_tokenizer.apply_chat_template(
            session.history[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ids == session.template.prompt(session.history[:-1])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        new = [int(t) for t in out[0, len(ids) :]]
        eos = model.generation_config.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        assert new == done.tokens
        assert theirs_tokenizer.decode(new, skip_special_tokens=True) == done.text
