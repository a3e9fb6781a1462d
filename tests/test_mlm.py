"""Masked-LM pretraining: encoder attention, masked-only loss, seeded batches, the whole run."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN_MODEL, random_batch, tiny_model, write_tiny_corpus
from flax import nnx

from lm.config import ConfigError, check_pretraining, load_config
from lm.data.batches import StepBatcher
from lm.data.masking import SPECIAL_IDS
from lm.data.mlm import MaskedStepBatches, Masking
from lm.data.pipeline import pack_documents
from lm.data.tokenizer import BOS_ID, MASK_ID
from lm.model import Transformer
from lm.model.heads import MaskedLM
from lm.train.objectives import TokenCrossEntropy


@pytest.fixture(scope="module")
def encoder():
    """(graphdef, params, jitted logits, jitted summed loss) of a tiny MaskedLM."""
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(MaskedLM(tiny_model(causal=False), rngs=nnx.Rngs(0)))

    @jax.jit
    def logits(params, tokens, segment_ids):
        return nnx.merge(graphdef, params)(tokens, segment_ids)

    @jax.jit
    def loss(params, batch):
        return TokenCrossEntropy().loss(nnx.merge(graphdef, params), batch, evaluating=True)

    return graphdef, params, logits, loss


def masked_batch(seed=0):
    batch = random_batch(seed=seed)
    keys = np.stack([np.zeros(8, int), np.zeros(8, int), np.arange(8)], axis=1)
    return Masking(rate=0.25, vocab_size=64, seed=seed).apply(batch, keys)


def test_mlm_loss_counts_only_masked_positions(encoder):
    _, params, _, loss = encoder
    batch = masked_batch()
    weights = batch["weights"]
    assert 0 < weights.sum() < weights.size
    total, sums = loss(params, batch)
    np.testing.assert_array_equal(np.asarray(sums["weight_sum"]), weights.sum(1))  # per row
    assert np.all((sums["correct_sum"] >= 0) & (sums["correct_sum"] <= sums["weight_sum"]))

    unmasked = {**batch, "targets": np.where(weights > 0, batch["targets"], 7)}
    np.testing.assert_allclose(loss(params, unmasked)[0], total, rtol=1e-6)
    masked = {**batch, "targets": np.where(weights > 0, (batch["targets"] + 1) % 64, 0)}
    assert abs(float(loss(params, masked)[0]) - float(total)) > 1e-3


def test_encoder_attends_both_ways_but_not_across_segments(encoder):
    _, params, logits, _ = encoder
    tokens = np.random.default_rng(0).integers(7, 64, (1, 16)).astype(np.int32)
    segments = np.array([[1] * 10 + [2] * 6], np.int32)
    changed = tokens.copy()
    changed[0, 8] = (tokens[0, 8] + 1) % 64  # a late token of the first segment
    before, after = logits(params, tokens, segments), logits(params, changed, segments)
    diff_L = np.abs(np.asarray(after - before)).max(-1)[0]
    assert diff_L[:8].min() > 1e-6, "earlier tokens of the segment must see a later one"
    np.testing.assert_array_equal(diff_L[10:], 0.0)  # the other segment does not see it

    with nnx.use_eager_sharding(False):
        causal = Transformer(tiny_model(), rngs=nnx.Rngs(0))
    causal_diff = np.abs(np.asarray(causal(changed, segments) - causal(tokens, segments)))
    np.testing.assert_array_equal(causal_diff[0, :8], 0.0)  # the causal LM is unchanged


def test_mlm_batches_are_seeded_per_row_and_independent_of_process_count():
    rng = np.random.default_rng(1)
    docs = [[BOS_ID, *rng.integers(7, 64, n)] for n in rng.integers(5, 40, 30)]
    masking = Masking(rate=0.15, vocab_size=64, seed=3)
    batches = MaskedStepBatches(StepBatcher(pack_documents(docs, 16), 8, seed=0), masking)
    whole = batches.local_batch(5, 0, 1)
    halves = [batches.local_batch(5, i, 2) for i in range(2)]
    for key, value in whole.items():
        np.testing.assert_array_equal(value, np.concatenate([h[key] for h in halves]))
        np.testing.assert_array_equal(value, batches.local_batch(5, 0, 1)[key])
    assert not np.array_equal(whole["inputs"], batches.local_batch(6, 0, 1)["inputs"])

    chosen = whole["weights"] > 0
    real = ~np.isin(whole["targets"], SPECIAL_IDS)
    assert not (chosen & ~real).any()  # never BOS or padding
    np.testing.assert_array_equal(chosen.sum(1), np.rint(0.15 * real.sum(1)))
    assert (whole["inputs"][chosen] == MASK_ID).mean() > 0.5
    np.testing.assert_array_equal(whole["inputs"][~chosen], whole["targets"][~chosen])


def test_objective_and_model_must_agree():
    with pytest.raises(ConfigError, match="train.objective=mlm needs a bidirectional encoder"):
        load_config(None, ["train.objective=mlm"])
    with pytest.raises(ConfigError, match="data.packing=pack or data.packing=truncate"):
        load_config(None, ["train.objective=mlm", "model.causal=false", "data.packing=window"])
    with pytest.raises(ConfigError, match="data.mask_rate must be in"):
        load_config(None, ["data.mask_rate=1.5"])
    with pytest.raises(ConfigError, match="set model.causal=true or train.objective=mlm"):
        check_pretraining(load_config(None, ["model.causal=false"]))


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    """A tiny encoder pretrained for a few steps through `lm pretrain` (objective mlm)."""
    from lm.commands.pretrain import pretrain

    root = tmp_path_factory.mktemp("mlm")
    corpus = write_tiny_corpus(root)
    cfg = load_config(
        None,
        [
            f"data.source={corpus}",
            f"data.data_dir={root / 'tfds'}",
            "data.seq_len=16",
            "data.batch_size=8",
            "data.validation_fraction=0.2",
            "data.mask_whole_words=true",
            *TINY_RUN_MODEL,
            "model.causal=false",
            "train.objective=mlm",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            f"train.run_dir={root / 'run'}",
            "train.steps=8",
            "train.log_every=4",
            "train.eval_every=4",
            "train.eval_batches=1",
            "checkpoint.every=8",
            "mesh.data=-1",
        ],
    )
    final = pretrain(cfg)
    return cfg, final


def test_mlm_pretrain_reports_masked_loss_and_accuracy(mlm_run, capsys):
    cfg, final = mlm_run
    run_dir = Path(cfg.train.run_dir)
    assert set(final) == {"loss", "perplexity", "accuracy", "tokens"}
    assert 0 < final["accuracy"] <= 1 and final["loss"] < np.log(300)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert json.loads((run_dir / "final_eval.json").read_text()) == final


def test_lm_evaluate_repeats_the_runs_masked_accuracy_and_scores_every_token(mlm_run):
    from lm.commands.evaluate import evaluate_run, evaluation_config
    from lm.data.pipeline import rows_for, tokenize_documents
    from lm.data.sources import load_documents
    from lm.run_dir import load_run

    cfg, final = mlm_run
    run_dir = cfg.train.run_dir
    report = evaluate_run(run_dir, evaluation_config(run_dir), pseudo_perplexity=True)
    metrics = report["metrics"]
    for key in ("loss", "accuracy", "tokens"):  # the same masks as pretraining's final eval
        assert metrics[key] == pytest.approx(final[key], rel=1e-6)

    run = load_run(run_dir)
    assert isinstance(run.model, MaskedLM)
    d = cfg.data
    docs = load_documents(d.source, d.data_dir, d.validation_fraction)["validation"]
    rows, _ = rows_for(tokenize_documents(run.tokenizer, docs), d.seq_len, "pack")
    inputs = rows.tokens[:, :-1]
    scorable = ~np.isin(inputs, SPECIAL_IDS)
    assert metrics["pseudo_tokens"] == scorable.sum()
    expected_bytes = run.tokenizer.token_bytes()[inputs[scorable]].sum()
    # Every byte of the text once (pack rows may leave the stream's very last token out).
    assert 0 <= sum(len(doc.encode()) for doc in docs) - expected_bytes <= 16
    nats = metrics["pseudo_loss"] * metrics["pseudo_tokens"]
    assert metrics["pseudo_bits_per_byte"] == pytest.approx(
        nats / (np.log(2) * expected_bytes), rel=1e-6
    )
    assert metrics["pseudo_perplexity"] == pytest.approx(np.exp(metrics["pseudo_loss"]))
    assert jnp.isfinite(metrics["pseudo_loss"]) and 0 <= metrics["pseudo_accuracy"] <= 1
