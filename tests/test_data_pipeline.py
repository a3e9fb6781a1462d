"""Packing keeps every token once, masks cross-document targets, and batches are step-indexed."""

from collections import Counter

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lm.config import DataConfig
from lm.data.pipeline import (
    PackedRows,
    StepBatches,
    eval_batches,
    load_pretrain_data,
    make_batch,
    pack_documents,
    to_global,
    tokenize_documents,
)
from lm.data.tokenizer import BOS_ID, PAD_ID, train_tokenizer


def _random_docs(count, seed=0):
    rng = np.random.default_rng(seed)
    return [np.array([BOS_ID, *rng.integers(10, 100, rng.integers(1, 40))]) for _ in range(count)]


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_packing_keeps_every_token_exactly_once(seq_len):
    docs = _random_docs(30)
    stream = np.concatenate(docs)
    rows = pack_documents(docs, seq_len)
    assert rows.tokens.shape == rows.doc_ids.shape == (len(rows), seq_len + 1)
    assert rows.tokens.dtype == rows.doc_ids.dtype == np.int32
    # Inputs of all rows plus the final target are the stream, followed only by padding.
    flat = np.concatenate([rows.tokens[:, :-1].ravel(), rows.tokens[-1:, -1]])
    np.testing.assert_array_equal(flat[: len(stream)], stream)
    assert (flat[len(stream) :] == PAD_ID).all() and len(flat) - len(stream) < seq_len
    targets = rows.tokens[:, 1:][rows.doc_ids[:, 1:] > 0]
    assert Counter(targets.tolist()) == Counter(stream[1:].tolist())
    # Consecutive rows overlap by exactly one token.
    np.testing.assert_array_equal(rows.tokens[1:, 0], rows.tokens[:-1, -1])


def test_packing_edge_cases():
    assert len(pack_documents([], 8)) == 0
    assert len(pack_documents([[BOS_ID]], 8)) == 0  # one token has no target
    rows = pack_documents([[BOS_ID, 5]], 8)
    assert rows.tokens.tolist() == [[BOS_ID, 5] + [PAD_ID] * 7]
    assert rows.padding_fraction == pytest.approx(7 / 8)


def test_hand_made_batch_weights_segments_positions():
    # Stream: doc1 = [2, 11, 12], doc2 = [2, 21], doc3 = [2, 31, 32, 33]; seq_len 4.
    rows = pack_documents([[2, 11, 12], [2, 21], [2, 31, 32, 33]], 4)
    assert rows.tokens.tolist() == [[2, 11, 12, 2, 21], [21, 2, 31, 32, 33]]
    assert rows.doc_ids.tolist() == [[1, 1, 1, 2, 2], [2, 3, 3, 3, 3]]
    batch = make_batch(rows, np.array([0, 1, -1]))
    assert batch["inputs"].tolist() == [[2, 11, 12, 2], [21, 2, 31, 32], [0, 0, 0, 0]]
    assert batch["targets"].tolist() == [[11, 12, 2, 21], [2, 31, 32, 33], [0, 0, 0, 0]]
    # The target BOS of the next document is not predicted from the previous one.
    assert batch["weights"].tolist() == [[1, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 2, 2, 2], [0, 0, 0, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 0, 0, 0]]
    assert {k: v.dtype for k, v in batch.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "weights": np.float32,
        "segment_ids": np.int32,
        "positions": np.int32,
    }


def test_weights_zero_exactly_at_cross_document_and_padding_targets():
    rows = pack_documents(_random_docs(25, seed=1), 16)
    batch = make_batch(rows, np.arange(len(rows)))
    doc_in, doc_out = rows.doc_ids[:, :-1], rows.doc_ids[:, 1:]
    expected = (doc_in == doc_out) & (doc_out > 0)
    np.testing.assert_array_equal(batch["weights"] == 1, expected)
    assert (batch["weights"] == 0).sum() == 24 + (doc_out == 0).sum()  # 24 boundaries + padding
    # Zero weight on a real target means that target is a BOS starting the next document.
    assert (batch["targets"][(batch["weights"] == 0) & (doc_out > 0)] == BOS_ID).all()


def _rows(count, seq_len=8):
    tokens = np.arange(count * (seq_len + 1), dtype=np.int32).reshape(count, seq_len + 1)
    return PackedRows(tokens=tokens, doc_ids=np.ones_like(tokens), seq_len=seq_len)


def test_same_step_gives_the_same_batch_in_fresh_instances():
    rows = _rows(50)
    a, b = StepBatches(rows, 8, seed=3), StepBatches(rows, 8, seed=3)
    for step in (0, 5, 17, 1000):
        np.testing.assert_array_equal(a.indices(step), b.indices(step))
        for key, value in a.local_batch(step).items():
            np.testing.assert_array_equal(value, b.local_batch(step)[key])
    assert not np.array_equal(a.indices(0), StepBatches(rows, 8, seed=4).indices(0))


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_assemble_the_single_process_batch(processes):
    batches = StepBatches(_rows(50), 8, seed=0)
    for step in (0, 9):
        whole = batches.local_batch(step, process_index=0, process_count=1)
        parts = [batches.local_batch(step, p, processes) for p in range(processes)]
        for key, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), value)


def test_epochs_cover_every_row_once_in_different_orders():
    batches = StepBatches(_rows(48), 8, seed=0)
    assert batches.steps_per_epoch == 6
    epochs = [np.concatenate([batches.indices(e * 6 + s) for s in range(6)]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(48))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    unshuffled = StepBatches(_rows(48), 8, seed=0, shuffle=False)
    assert unshuffled.indices(7).tolist() == list(range(8, 16))


def test_step_batches_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"packs into 3 rows .* global batch of 8"):
        StepBatches(_rows(3), 8, seed=0)
    with pytest.raises(ValueError, match=r"batch_size=8 must divide evenly over 3 processes"):
        StepBatches(_rows(20), 8, seed=0).local_batch(0, 0, 3)


def test_eval_batches_pad_the_last_batch():
    rows = _rows(10)
    batches = list(eval_batches(rows, 4))
    assert len(batches) == 3
    inputs = np.concatenate([b["inputs"] for b in batches])
    np.testing.assert_array_equal(inputs[:10], rows.tokens[:, :-1])
    assert (inputs[10:] == PAD_ID).all() and batches[-1]["weights"][2:].sum() == 0
    assert batches[-1]["weights"][:2].all()
    assert len(list(eval_batches(rows, 4, max_batches=2))) == 2


def test_to_global_lays_out_local_rows_on_the_mesh():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local = StepBatches(_rows(40), 16, seed=0).local_batch(2)
    arrays = to_global(local, sharding)
    for key, value in local.items():
        assert arrays[key].shape == value.shape and arrays[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(arrays[key]), value)


def test_load_pretrain_data_trains_reuses_and_checks_the_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]
    rng = np.random.default_rng(0)
    for i in range(12):
        (corpus / f"{i}.txt").write_text(" ".join(rng.choice(words, 300)) + "\n")
    config = DataConfig(
        source=str(corpus),
        data_dir=str(tmp_path / "data"),
        seq_len=32,
        batch_size=4,
        validation_fraction=0.2,
    )
    data = load_pretrain_data(config, tmp_path / "run", vocab_size=300)
    model = tmp_path / "run" / "tokenizer.model"
    assert model.is_file() and data.tokenizer.vocab_size == 300
    assert data.token_bytes.shape == (300,) and len(data.validation) > 0
    batch = data.train.local_batch(0)
    assert batch["inputs"].shape == (4, 32)
    text = data.tokenizer.decode(batch["inputs"][0])
    assert set(text.split()[1:-1]) <= set(words)  # a row may cut a word at either end
    mtime = model.stat().st_mtime_ns
    again = load_pretrain_data(config, tmp_path / "run", vocab_size=300)
    assert model.stat().st_mtime_ns == mtime  # reused, not retrained
    np.testing.assert_array_equal(again.train.indices(3), data.train.indices(3))
    with pytest.raises(ValueError, match=r"has 300 pieces .* set model\.vocab_size=300"):
        load_pretrain_data(config, tmp_path / "run", vocab_size=512)


def test_tokenize_documents_prepends_bos(tmp_path):
    tok = train_tokenizer(["hello world, hello there\n"] * 50, tmp_path / "t.model", 280)
    docs = tokenize_documents(tok, ["hello", "there world"])
    assert [d[0] for d in docs] == [BOS_ID, BOS_ID] and all(d.dtype == np.int32 for d in docs)
    assert tok.decode(docs[1]) == "there world"
