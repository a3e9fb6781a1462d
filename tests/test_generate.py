"""Cached generation: parity with full recomputation, sampling filters, stops, bad input, CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model
from flax import nnx
from scipy import stats

from lm.cli import main
from lm.config import Config, MeshConfig
from lm.data.tokenizer import EOS_ID, train_tokenizer
from lm.inference.generator import Generator
from lm.inference.sampling import filter_logits, penalize_repeats
from lm.model import Transformer
from lm.model.kv_cache import KVCache
from lm.run_dir import write_params_run
from lm.runtime.mesh import make_mesh, state_shardings

WORDS = ["the", "king", "queen", "and", "of", "to", "my", "lord", "is", "what", "thou", "hath"]
VOCAB = 300


def _model(cfg, mesh=None) -> Transformer:
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    if mesh is None:
        return model
    graphdef, params = nnx.split(model)
    params = jax.device_put(params, state_shardings(params, mesh))
    return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(200)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", VOCAB)


@pytest.fixture(scope="module")
def text_generator(tokenizer) -> Generator:
    cfg = tiny_model(vocab_size=VOCAB, max_seq_len=64, tie_embeddings=False)
    return Generator(_model(cfg), tokenizer)


def _prompts(lengths, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(7, vocab, n)] for n in lengths]


def _full_recompute_greedy(model, prompts, steps):
    """Greedy tokens and every step's logits by running the whole left-padded sequence again.

    The sequence grows inside a fixed buffer (causal attention ignores the unused tail), so the
    forward pass compiles once."""
    length = max(len(p) for p in prompts)
    rows = np.zeros((len(prompts), length + steps), np.int32)
    pads = np.array([length - len(p) for p in prompts])
    for i, p in enumerate(prompts):
        rows[i, pads[i] : length] = p
    slots = np.arange(rows.shape[1])[None]
    segments = (slots >= pads[:, None]).astype(np.int32)  # padding is its own segment
    positions = np.maximum(slots - pads[:, None], 0)
    forward = jax.jit(lambda m, t: m(t, segments, positions))
    logits, tokens = [], []
    for t in range(steps):
        step_logits = np.asarray(forward(model, rows))[:, length - 1 + t]
        rows[:, length + t] = step_logits.argmax(-1)
        logits.append(step_logits)
        tokens.append(rows[:, length + t])
    return np.stack(logits, 1), np.stack(tokens, 1)


def _cached_greedy(model, prompts, steps, mesh):
    """The same through the KV cache: a prefill, then one cached step per token."""
    length = max(len(p) for p in prompts)
    rows = np.zeros((len(prompts), length), np.int32)
    pads = np.array([length - len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        rows[i, pads[i] :] = p

    @jax.jit
    def run(model, rows, pads):
        cache = KVCache.zeros(model.cfg, pads, length + steps)
        step_logits, cache = model(rows, cache=cache)
        step_logits = step_logits[:, -1]
        logits, tokens = [], []
        for _ in range(steps):
            nxt = jnp.argmax(step_logits, -1).astype(jnp.int32)
            logits.append(step_logits)
            tokens.append(nxt)
            step_logits, cache = model(nxt[:, None], cache=cache)
            step_logits = step_logits[:, 0]
        return jnp.stack(logits, 1), jnp.stack(tokens, 1)

    with jax.set_mesh(mesh):
        logits, tokens = run(model, rows, pads)
    return np.asarray(logits), np.asarray(tokens)


@pytest.mark.parametrize(
    "kv_heads,scan,devices",
    [
        pytest.param(0, True, 1, id="mha-scan-1dev"),
        pytest.param(2, False, 8, id="gqa-unrolled-8dev"),
        pytest.param(2, True, 1, id="gqa-scan-1dev", marks=pytest.mark.slow),
        pytest.param(0, False, 8, id="mha-unrolled-8dev", marks=pytest.mark.slow),
    ],
)
def test_cached_decoding_matches_full_recompute_with_left_padding(kv_heads, scan, devices):
    cfg = tiny_model(num_kv_heads=kv_heads, scan_layers=scan, max_seq_len=32)
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2) if devices == 8 else MeshConfig(data=1)
    mesh = make_mesh(mesh_cfg, jax.devices()[:devices])
    model = _model(cfg, mesh)
    prompts = _prompts([9, 4, 9, 1])  # rows 0 and 2 unpadded, rows 1 and 3 left-padded
    steps = 6
    full_logits, full_tokens = _full_recompute_greedy(model, prompts, steps)
    cached_logits, cached_tokens = _cached_greedy(model, prompts, steps, mesh)
    np.testing.assert_allclose(cached_logits, full_logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cached_tokens, full_tokens)
    completions = Generator(model, None, mesh=mesh).generate_ids(prompts, max_new_tokens=steps)
    assert [c.tokens for c in completions] == full_tokens.tolist()
    logp = jax.nn.log_softmax(full_logits, -1)
    expected = np.take_along_axis(logp, full_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose([c.logprobs for c in completions], expected, atol=1e-5)


@pytest.fixture(scope="module")
def id_generator() -> Generator:
    return Generator(_model(tiny_model(max_seq_len=32)), None)


def test_degenerate_sampling_settings_equal_greedy(id_generator):
    prompts = _prompts([3, 7, 5], seed=1)
    greedy = [c.tokens for c in id_generator.generate_ids(prompts, max_new_tokens=8)]
    for options in [
        {"temperature": 1.0, "top_k": 1},
        {"temperature": 1.0, "top_p": 1e-6},
        {"temperature": 1e-6},
    ]:
        sampled = id_generator.generate_ids(prompts, max_new_tokens=8, seed=3, **options)
        assert [c.tokens for c in sampled] == greedy, options
    beam = id_generator.beam_search(prompts, max_new_tokens=8, num_beams=1)
    assert [c.tokens for c in beam] == greedy


def test_beam_search_reorders_the_cache_with_its_beams(id_generator):
    prompts = _prompts([6, 3], seed=4)
    beams = id_generator.beam_search(prompts, max_new_tokens=6, num_beams=3, length_penalty=0.5)
    # Recompute each chosen beam in one causal pass (right padding cannot change its logits).
    rows = np.zeros((len(prompts), 12), np.int32)
    for i, (prompt, beam) in enumerate(zip(prompts, beams, strict=True)):
        assert beam.tokens and beam.finish_reason in ("eos", "length")
        rows[i, : len(prompt) + len(beam.tokens)] = prompt + beam.tokens
    model = nnx.merge(id_generator.graphdef, id_generator.params)
    logp = np.asarray(jax.jit(lambda m, t: jax.nn.log_softmax(m(t), -1))(model, rows))
    for i, (prompt, beam) in enumerate(zip(prompts, beams, strict=True)):
        at = np.arange(len(prompt) - 1, len(prompt) - 1 + len(beam.tokens))
        np.testing.assert_allclose(logp[i, at, beam.tokens], beam.logprobs, atol=1e-5)


def test_sampling_is_seed_reproducible(id_generator):
    prompts = _prompts([4, 4], seed=2)
    runs = [
        [
            c.tokens
            for c in id_generator.generate_ids(prompts, max_new_tokens=8, temperature=2.0, seed=s)
        ]
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_sampled_frequencies_match_the_filtered_distribution(id_generator):
    prompt = _prompts([5], seed=3)[0]
    model = nnx.merge(id_generator.graphdef, id_generator.params)
    logits = model(jnp.asarray([prompt]))[:, -1]
    # A fresh model's logits are nearly flat: temper them so the filters cut something.
    temperature = float(logits.std())
    top_k, top_p, min_p = 12, 0.5, 0.05
    filtered = filter_logits(
        logits / temperature, jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p)
    )
    probs = np.asarray(jax.nn.softmax(filtered, -1))[0]
    support = probs > 0
    assert 2 <= support.sum() < top_k  # the nucleus cuts inside the top-k
    draws = 4000
    options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    completions = id_generator.generate_ids([prompt] * draws, max_new_tokens=1, seed=0, **options)
    counts = np.bincount([c.tokens[0] for c in completions], minlength=64)
    assert counts[~support].sum() == 0
    kept = probs[support].astype(np.float64)
    expected = kept / kept.sum() * draws  # float64, so both sums agree as chisquare demands
    _, p_value = stats.chisquare(counts[support], expected)
    assert p_value > 1e-3


def test_repetition_penalty_scales_seen_logits_only():
    logits = jnp.array([[2.0, -2.0, 2.0, -2.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(
        penalize_repeats(logits, seen, jnp.float32(2.0)), [[1.0, -4.0, 2.0, -2.0]]
    )


def test_stop_strings_cut_exactly_and_stream_the_same_text(text_generator):
    [free] = text_generator.generate(["the king"], max_new_tokens=24)
    assert free.finish_reason == "length" and len(free.text) > 8
    stop = free.text[5:8]
    first = free.text.find(stop)
    pieces = []
    [cut] = text_generator.generate(
        ["the king"],
        max_new_tokens=24,
        stop=["no such text", stop],
        on_token=lambda row, text: pieces.append((row, text)),
    )
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:first]
    assert "".join(text for _, text in pieces) == cut.text
    assert {row for row, _ in pieces} <= {0}
    assert cut.tokens == free.tokens[: len(cut.tokens)]


def test_eos_stops_each_sequence_on_its_own(text_generator):
    prompts = ["the king", "my lord is"]
    base = text_generator.generate(prompts, max_new_tokens=10)
    # Make EOS win wherever row 0's third token would: logit(EOS) = 1.5 * logit(that token).
    target = base[0].tokens[2]
    assert target not in base[1].tokens
    # A clone: merge shares variables with the fixture's params, which later tests reuse.
    model = nnx.clone(nnx.merge(text_generator.graphdef, text_generator.params))
    model.unembed[...] = model.unembed[...].at[EOS_ID].set(1.5 * model.unembed[...][target])
    out = Generator(model, text_generator.tokenizer).generate(prompts, max_new_tokens=10)
    assert base[0].logprobs[2] > -np.log(VOCAB)  # the target's logit led, so it is positive
    assert (out[0].finish_reason, out[0].tokens) == ("eos", base[0].tokens[:2])
    assert (out[1].finish_reason, out[1].tokens) == ("length", base[1].tokens)


def test_prompts_of_twenty_lengths_and_varying_batch_sizes_compile_few_times(tokenizer):
    generator = Generator(_model(tiny_model(vocab_size=VOCAB, max_seq_len=64)), tokenizer)
    for n in range(1, 21):
        generator.generate_ids([[2] + [7] * (n - 1)], max_new_tokens=4)
    # prompt buckets 16 and 32, cache buckets 32 and 64: one prefill + one step each
    assert generator.compiles == 4
    outputs = {}
    for size in (5, 8, 6, 7):
        completions = generator.generate_ids([[2, 7, 7]] * size, max_new_tokens=4)
        outputs[size] = [c.tokens for c in completions]
    # batches of 5-8 rows share the batch bucket 8 (one more prefill and step), and the dummy
    # rows that fill it change nothing
    assert generator.compiles == 6
    assert all(rows == outputs[8][:size] for size, rows in outputs.items())


def test_bad_input_is_named(text_generator):
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        text_generator.generate(["the", ""], max_new_tokens=2)
    long_prompt = " ".join(["king"] * 80)
    with pytest.raises(ValueError, match="context is 64"):
        text_generator.generate([long_prompt], max_new_tokens=2)
    [truncated] = text_generator.generate([long_prompt], max_new_tokens=2, truncate_prompt=True)
    assert len(truncated.tokens) == 1 and truncated.finish_reason == "length"
    with pytest.raises(ValueError, match="top_p"):
        text_generator.generate(["the"], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        Generator.from_run("/nonexistent/run")


def test_generate_cli_prints_json_and_streams_text(tmp_path, tokenizer, capsys):
    cfg = Config()
    cfg.model = tiny_model(vocab_size=VOCAB, max_seq_len=64)
    cfg.data = dataclasses.replace(cfg.data, seq_len=64)
    run_dir = tmp_path / "run"
    write_params_run(run_dir, cfg, nnx.state(_model(cfg.model)))
    (run_dir / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king\nmy lord\n")
    args = ["generate", "--run", str(run_dir), "--max-new-tokens", "5"]
    assert main([*args, "--prompts-file", str(prompts), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == ["the king", "my lord"]
    assert all(len(r["tokens"]) == len(r["logprobs"]) <= 5 for r in records)
    assert all(r["finish_reason"] in ("eos", "length") and "seconds" in r for r in records)
    assert main([*args, "--prompt", "the king"]) == 0
    assert capsys.readouterr().out.startswith("the king" + records[0]["text"])
    assert main(["generate", "--run", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (run_dir / "tokenizer.model").unlink()
    assert main([*args, "--prompt", "the king"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "has no tokenizer.model or tokenizer.json" in captured.err
    # As with lm evaluate, data.tokenizer=PATH names the tokenizer of a run saved without one.
    assert main([*args, "--prompt", "the king", "--json", f"data.tokenizer={tokenizer.path}"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == records[0]["text"]
    assert main([*args, "--prompt", "the king", "data.seq_len=8"]) == 2
    assert "data.tokenizer=PATH and mesh.* overrides only" in capsys.readouterr().err
