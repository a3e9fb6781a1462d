"""Text-to-text scoring reuses one Generator (no recompilation) across evaluations."""

import pytest
from conftest import tiny_model
from flax import nnx

from lm.config import Config, DataConfig, FinetuneConfig
from lm.data.tokenizer import BOS_ID, train_tokenizer
from lm.evaluation.tasks import AnswerScorer
from lm.inference.generator import Generator
from lm.model import Transformer

PROMPTS = ["the king", "my lord is", "what of the queen", "thou and"]


def _model(seed: int, **overrides) -> Transformer:
    with nnx.use_eager_sharding(False):
        return Transformer(
            tiny_model(vocab_size=300, max_seq_len=32, tie_embeddings=False, **overrides),
            rngs=nnx.Rngs(seed),
        )


def test_scorer_swaps_weights_into_one_compiled_generator(tmp_path):
    words = ["the king and the queen of my lord", "what is thou"] * 20
    tokenizer = train_tokenizer(words, tmp_path / "tokenizer.model", 300)
    cfg = Config(
        model=tiny_model(vocab_size=300, max_seq_len=32, tie_embeddings=False),
        data=DataConfig(seq_len=16),
        finetune=FinetuneConfig(
            task="text_to_text", template="{input}:", max_new_tokens=6, generate_examples=0
        ),
    )
    first, second = _model(1), _model(2)
    prompts = [[BOS_ID, *tokenizer.encode(p + ":")] for p in PROMPTS]
    fresh = Generator(second, tokenizer, max_len=22).generate_ids(
        prompts, max_new_tokens=6, stop=["\n"], truncate_prompt=True
    )
    answers = [c.text for c in fresh]  # what `second` answers, decoded from scratch

    scorer = AnswerScorer(cfg, tokenizer, mesh=None)
    assert scorer(first, (PROMPTS, answers))["exact_match"] < 1.0
    compiles = scorer.generator.compiles
    assert scorer(second, (PROMPTS, answers))["exact_match"] == 1.0
    assert scorer.generator.compiles == compiles


def test_set_weights_refuses_another_architecture():
    generator = Generator(_model(1), None)
    with pytest.raises(ValueError, match="another architecture"):
        generator.set_weights(_model(1, num_layers=3))
