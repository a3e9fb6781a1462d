"""Generation parity with Hugging Face `generate()`: tiny random GPT-2 and GQA Llama models from
`transformers`, imported with lm.interop, give the same greedy and beam-search tokens on a
left-padded batch, and our sampling filters equal HF's logits processors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import VOCAB, gpt2, llama, randomize, save  # noqa: E402
from transformers.generation import logits_process  # noqa: E402

from lm.config import MeshConfig  # noqa: E402
from lm.data.tokenizer import EOS_ID, PAD_ID  # noqa: E402
from lm.inference.generator import Generator  # noqa: E402
from lm.inference.sampling import filter_logits, penalize_repeats  # noqa: E402
from lm.interop.convert import import_hf  # noqa: E402
from lm.runtime.mesh import make_mesh  # noqa: E402

NEW_TOKENS = 10
PROMPT_LENGTHS = [5, 2, 7, 4]  # left padding for all rows but the third


# The EOS output row becomes this multiple of the row of the token greedy decoding emits most:
# EOS then competes with that token (and wins where it leads, for factors above 1).
EOS_FACTOR = {"gpt2": 0.97, "llama": 1.03}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request, tmp_path_factory):
    """(HF model, our Generator on the imported weights) for each architecture."""
    # Large random weights, so next-token distributions are peaked.
    hf = randomize({"gpt2": gpt2, "llama": llama}[request.param](), scale=0.3)
    common = np.bincount(sum(_hf_generate(hf, _prompts()), []), minlength=VOCAB).argmax()
    with torch.no_grad():
        head = hf.get_output_embeddings().weight
        head[EOS_ID] = head[common] * EOS_FACTOR[request.param]
    path = save(hf, tmp_path_factory, request.param)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    _, graphdef, params = import_hf(path, mesh)
    return hf, Generator(nnx.merge(graphdef, params), None, mesh=mesh)


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(4, VOCAB, n)] for n in PROMPT_LENGTHS]


def _hf_generate(hf, prompts, **options) -> list[list[int]]:
    """HF's new tokens per row, up to and including the first EOS."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), PAD_ID)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            **options,
        )
    rows = [[int(t) for t in row] for row in out[:, length:]]
    return [row[: row.index(EOS_ID) + 1] if EOS_ID in row else row for row in rows]


def _ours(generator, prompts, **options) -> list[list[int]]:
    completions = generator.generate_ids(prompts, max_new_tokens=NEW_TOKENS, **options)
    return [c.tokens + [EOS_ID] * (c.finish_reason == "eos") for c in completions]


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.5])
def test_greedy_tokens_equal_transformers(models, repetition_penalty):
    hf, generator = models
    prompts = _prompts()
    options = {"repetition_penalty": repetition_penalty}
    assert _ours(generator, prompts, **options) == _hf_generate(hf, prompts, **options)


@pytest.mark.parametrize(
    "length_penalty,early_stopping,repetition_penalty",
    [
        (0.7, False, 1.0),
        (1.3, False, 1.0),
        (1.0, True, 1.0),
        (1.3, "never", 1.0),
        (1.0, False, 1.5),
    ],
)
def test_beam_search_tokens_equal_transformers(
    models, length_penalty, early_stopping, repetition_penalty
):
    hf, generator = models
    prompts = _prompts()
    options = {
        "num_beams": 3,
        "length_penalty": length_penalty,
        "early_stopping": early_stopping,
        "repetition_penalty": repetition_penalty,
    }
    assert _ours(generator, prompts, **options) == _hf_generate(hf, prompts, **options)


def test_beam_cases_end_at_eos_and_depend_on_the_length_penalty(models):
    """The parity cases above are worth something: EOS fires inside the search, and the length
    penalty changes which finished hypotheses win."""
    hf, _ = models
    short, long = (
        _hf_generate(hf, _prompts(), num_beams=3, length_penalty=lp) for lp in (0.7, 1.3)
    )
    assert any(len(row) < NEW_TOKENS and row[-1] == EOS_ID for row in short + long)
    assert short != long


def _hf_filtered(logits, seen_ids, temperature, top_k, top_p, min_p, penalty) -> np.ndarray:
    processors = [logits_process.RepetitionPenaltyLogitsProcessor(penalty)]
    processors.append(logits_process.TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(logits_process.TopKLogitsWarper(top_k))
    if top_p < 1:
        processors.append(logits_process.TopPLogitsWarper(top_p))
    if min_p:
        processors.append(logits_process.MinPLogitsWarper(min_p))
    scores = torch.tensor(logits)
    for processor in processors:
        scores = processor(torch.tensor(seen_ids), scores)
    return scores.numpy()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 12, 1.0, 0.0), (0.7, 0, 0.6, 0.0), (1.3, 12, 0.6, 0.0), (1.0, 0, 1.0, 0.1)]
    + [(0.8, 20, 0.8, 0.05)],
)
def test_penalty_and_filters_equal_transformers_logits_processors(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, VOCAB)) * 1.5).astype(np.float32)
    seen_ids = rng.integers(0, VOCAB, (4, 10))
    seen = np.zeros((4, VOCAB), bool)
    np.put_along_axis(seen, seen_ids, True, axis=1)
    expected = _hf_filtered(logits, seen_ids, temperature, top_k, top_p, min_p, 1.3)
    ours = filter_logits(
        penalize_repeats(jnp.asarray(logits), jnp.asarray(seen), jnp.float32(1.3)) / temperature,
        jnp.int32(top_k),
        jnp.float32(top_p),
        jnp.float32(min_p),
    )
    ours = np.asarray(ours)
    kept = np.isfinite(expected)
    assert kept.sum(-1).min() > 1 and kept.sum(-1).max() < VOCAB  # each filter cuts something
    np.testing.assert_array_equal(np.isfinite(ours), kept)
    np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6)
