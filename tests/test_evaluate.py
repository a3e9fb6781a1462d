"""`lm evaluate` on causal runs: strided perplexity, bits-per-byte, mesh invariance, errors."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_model
from flax import nnx

from lm.cli import main
from lm.commands.evaluate import evaluate_run, evaluation_config
from lm.config import Config, ConfigError, DataConfig, MeshConfig
from lm.data.batches import ordered_batches
from lm.data.pipeline import rows_for, tokenize_documents
from lm.data.sources import load_documents
from lm.data.tokenizer import BOS_ID, PAD_ID, train_tokenizer
from lm.evaluation.lm_metrics import evaluate_lm
from lm.model.build import build_model
from lm.run_dir import load_run, write_params_run
from lm.runtime.mesh import batch_sharding, make_mesh
from lm.train.objectives import TokenCrossEntropy
from lm.train.step import make_eval_step

SEQ_LEN = 16
LINES = [
    "To be, or not to be: that is the question — naïve café ✓",
    "Whether 'tis nobler in the mind to suffer the slings and arrows",
    "of outrageous fortune, or to take arms against a sea of troubles",
    "And by opposing end them. To die — to sleep, no more; und über",
    "Thus conscience does make cowards of us all; ¿qué? ½ ∞ 🙂",
]


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    """A randomly initialised tiny causal LM written as a run, with its own tokenizer."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        lines = [LINES[(i + j) % len(LINES)][j:] for j in range(4)]
        (corpus / f"part{i}.txt").write_text("\n".join(lines) + "\n")
    run_dir = root / "run"
    run_dir.mkdir()
    texts = [line for path in sorted(corpus.iterdir()) for line in path.read_text().splitlines()]
    tokenizer = train_tokenizer(texts, run_dir / "tokenizer.model", 340, "bpe")
    cfg = Config(
        model=tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=SEQ_LEN, num_layers=1),
        data=DataConfig(
            source=str(corpus),
            data_dir=str(root / "tfds"),
            text_unit="line",
            seq_len=SEQ_LEN,
            batch_size=8,
            validation_fraction=0.3,
        ),
    )
    with nnx.use_eager_sharding(False):
        write_params_run(run_dir, cfg, nnx.state(build_model(cfg, nnx.Rngs(0))))
    return run_dir


@pytest.fixture(scope="module")
def one_device(causal_run):
    """(params on a 1-device mesh, jitted [1, L] logits, `score(docs, packing, stride)`)."""
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    run = load_run(causal_run, mesh=mesh)
    eval_step = make_eval_step(run.graphdef, TokenCrossEntropy())

    @jax.jit
    def logits(params, tokens_1xL):
        return nnx.merge(run.graphdef, params)(tokens_1xL)

    def score(docs, packing, stride=0):
        rows, _ = rows_for(docs, SEQ_LEN, packing, stride)
        batches = ordered_batches(rows, 8)
        return evaluate_lm(eval_step, run.params, batches, None, batch_sharding(mesh))

    return mesh, run, logits, score


def log_probs(logits, params, ids):
    """log p(ids[j] | ids[:j]) for j >= 1, one causal forward of at most SEQ_LEN inputs."""
    inputs = np.full((1, SEQ_LEN), PAD_ID, np.int32)
    inputs[0, : len(ids) - 1] = ids[:-1]  # padding after the tokens cannot affect them
    z = np.asarray(logits(params, inputs), np.float64)[0, : len(ids) - 1]
    z = z - z.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return lp[np.arange(len(ids) - 1), ids[1:]]


def hf_strided_nll(logits, params, ids, stride):
    """(summed nll, scored tokens) by Hugging Face's strided-perplexity loop, in numpy.

    A window holds SEQ_LEN + 1 tokens (SEQ_LEN predictions); each window scores only the
    `end - prev_end` tokens it adds, the first window all of its predictions.
    """
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + SEQ_LEN + 1, len(ids))
        lp = log_probs(logits, params, ids[begin:end])  # entries predict ids[begin + 1 : end]
        new = min(end - prev_end, len(lp))
        nll -= lp[len(lp) - new :].sum()
        count += new
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def random_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [np.array([BOS_ID, *rng.integers(7, 300, n - 1)], np.int32) for n in lengths]


def test_window_with_stride_seq_len_equals_perplexity_of_truncated_chunks(one_device):
    *_, score = one_device
    docs = random_docs([50, 23, 40, 17])
    # Chunks of SEQ_LEN + 1 tokens overlapping by one: each chunk's first token is context.
    chunks = [d[k : k + SEQ_LEN + 1] for d in docs for k in range(0, len(d) - 1, SEQ_LEN)]
    windowed, truncated = score(docs, "window", SEQ_LEN), score(chunks, "truncate")
    assert windowed["tokens"] == truncated["tokens"] == sum(len(d) - 1 for d in docs)
    assert windowed["loss"] == pytest.approx(truncated["loss"], rel=1e-6)
    assert windowed["loss"] != pytest.approx(score(docs, "window", 4)["loss"], rel=1e-4)


@pytest.mark.parametrize("stride", [1, 5, SEQ_LEN])
def test_document_shorter_than_the_window_gets_full_context_perplexity(one_device, stride):
    _, run, logits, score = one_device
    docs = random_docs([12, SEQ_LEN + 1, 2], seed=stride)
    full = -np.concatenate([log_probs(logits, run.params, d) for d in docs])
    result = score(docs, "window", stride)
    assert result["tokens"] == len(full)
    assert result["loss"] == pytest.approx(full.mean(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(full.mean()), rel=1e-5)


def test_scored_tokens_equal_document_length_minus_one_for_any_stride(one_device):
    *_, score = one_device
    docs = random_docs([2, 9, 17, 18, 40, 53])
    for stride in (1, 2, 3, 7, 15, SEQ_LEN):
        assert score(docs, "window", stride)["tokens"] == sum(len(d) - 1 for d in docs), stride


def test_window_perplexity_and_bits_per_byte_match_hugging_face_loop_in_numpy(
    causal_run, one_device
):
    mesh, run, logits, _ = one_device
    cfg = evaluation_config(causal_run, overrides=["data.packing=window", "data.stride=5"])
    report = evaluate_run(causal_run, cfg, mesh=mesh)
    d = cfg.data
    docs = load_documents(d.source, d.data_dir, d.validation_fraction, None, d.text_unit)
    texts = docs["validation"]
    ids = tokenize_documents(run.tokenizer, texts)
    assert max(len(i) for i in ids) > 2 * SEQ_LEN  # long documents: windows really slide
    per_doc = np.array([hf_strided_nll(logits, run.params, i, 5) for i in ids])
    nll, count = per_doc[:, 0].sum(), per_doc[:, 1].sum()
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert text_bytes > sum(len(t) for t in texts)  # multi-byte characters are in play

    metrics = report["metrics"]
    assert metrics["tokens"] == count == sum(len(i) - 1 for i in ids)
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(nll / (np.log(2) * text_bytes), rel=1e-5)
    written = json.loads(Path(report["path"]).read_text())
    assert Path(report["path"]) == causal_run / "eval/corpus-validation-window5-L16-step0.json"
    assert written["metrics"] == metrics and written["stride"] == 5


def test_cli_on_a_2x2x2_mesh_matches_one_device(causal_run, one_device, capsys):
    mesh = one_device[0]
    overrides = ["data.packing=truncate", "data.batch_size=5"]  # rounded up to 8 rows on 2x2x2
    single = evaluate_run(causal_run, evaluation_config(causal_run, overrides=overrides), mesh=mesh)
    output = causal_run / "sharded.json"
    mesh_overrides = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    argv = ["evaluate", "--run", str(causal_run), "--output", str(output)]
    assert main(argv + overrides + mesh_overrides) == 0
    sharded = json.loads(output.read_text())
    assert sharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    for key in ("loss", "bits_per_byte", "accuracy", "tokens"):
        assert sharded["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-6), key
    # exp() turns the loss's relative error into an absolute one of perplexity's log.
    assert np.log(sharded["metrics"]["perplexity"]) == pytest.approx(sharded["metrics"]["loss"])
    printed = capsys.readouterr().out
    assert "bits_per_byte" in printed and "truncate, seq_len 16" in printed


def test_evaluate_errors_name_the_problem(causal_run, tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "missing")]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model.\\* and train.objective must match the run's"):
        evaluation_config(causal_run, overrides=["model.d_model=64"])
    assert main(["evaluate", "--run", str(causal_run), "--pseudo-perplexity"]) == 2
    assert "Pseudo-perplexity is for masked-LM runs" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(causal_run), "--split", "test"]) == 2
    assert "has no 'test' split; choose one of ['train', 'validation']" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(causal_run), "data.seq_len=64"]) == 2
    assert "data.seq_len=64 is longer than model.max_seq_len=16" in capsys.readouterr().err
    classifier = evaluation_config(causal_run)
    classifier.finetune = dataclasses.replace(classifier.finetune, task="classification")
    with pytest.raises(ValueError, match="not tokens; lm evaluate scores language models"):
        evaluate_run(causal_run, classifier)
