"""Packing keeps every token once, masks cross-document targets, and batches are step-indexed;
truncation and strided windows score what they promise and report what they drop."""

from collections import Counter

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lm.config import ConfigError, DataConfig, load_config
from lm.data.batches import StepBatcher, ordered_batches
from lm.data.pipeline import (
    PackedRows,
    RowStats,
    load_pretrain_data,
    make_batch,
    pack_documents,
    rows_for,
    tokenize_documents,
    truncate_documents,
    window_documents,
)
from lm.data.tokenizer import BOS_ID, PAD_ID, train_tokenizer
from lm.runtime.mesh import to_global


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
    a, b = StepBatcher(rows, 8, seed=3), StepBatcher(rows, 8, seed=3)
    for step in (0, 5, 17, 1000):
        np.testing.assert_array_equal(a.indices(step), b.indices(step))
        for key, value in a.local_batch(step).items():
            np.testing.assert_array_equal(value, b.local_batch(step)[key])
    assert not np.array_equal(a.indices(0), StepBatcher(rows, 8, seed=4).indices(0))


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_assemble_the_single_process_batch(processes):
    batches = StepBatcher(_rows(50), 8, seed=0)
    for step in (0, 9):
        whole = batches.local_batch(step, process_index=0, process_count=1)
        parts = [batches.local_batch(step, p, processes) for p in range(processes)]
        for key, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), value)


def test_epochs_cover_every_row_once_in_different_orders():
    batches = StepBatcher(_rows(48), 8, seed=0)
    assert batches.steps_per_epoch == 6
    epochs = [np.concatenate([batches.indices(e * 6 + s) for s in range(6)]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(48))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    unshuffled = StepBatcher(_rows(48), 8, seed=0, shuffle=False)
    assert unshuffled.indices(7).tolist() == list(range(8, 16))


def test_step_batches_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"packs into 3 rows .* global batch of 8"):
        StepBatcher(_rows(3), 8, seed=0)
    with pytest.raises(ValueError, match=r"batch_size=8 must divide evenly over 3 processes"):
        StepBatcher(_rows(20), 8, seed=0).local_batch(0, 0, 3)


def test_eval_batches_pad_the_last_batch():
    rows = _rows(10)
    batches = list(ordered_batches(rows, 4))
    assert len(batches) == 3
    inputs = np.concatenate([b["inputs"] for b in batches])
    np.testing.assert_array_equal(inputs[:10], rows.tokens[:, :-1])
    assert (inputs[10:] == PAD_ID).all() and batches[-1]["weights"][2:].sum() == 0
    assert batches[-1]["weights"][:2].all()
    assert len(list(ordered_batches(rows, 4, max_batches=2))) == 2


def test_to_global_lays_out_local_rows_on_the_mesh():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local = StepBatcher(_rows(40), 16, seed=0).local_batch(2)
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


def _numbered_docs(lengths):
    """Documents whose token j of document d is 1000 * d + j, so targets name themselves."""
    return [np.array([BOS_ID, *range(1000 * d + 1, 1000 * d + n)]) for d, n in enumerate(lengths)]


def _scored(rows):
    """(target token, left-context length, inputs) of every target that carries loss."""
    batch = make_batch(rows, np.arange(len(rows)))
    r, c = np.nonzero(batch["weights"])
    assert set(np.unique(batch["weights"])) <= {0.0, 1.0}
    return batch["targets"][r, c], batch["positions"][r, c] + 1, batch["inputs"], r, c


def test_window_with_stride_seq_len_scores_the_non_overlapping_chunks():
    seq_len = 8
    docs = _numbered_docs([1, 2, 8, 9, 10, 17, 30])
    rows = window_documents(docs, seq_len, seq_len)
    # Chunking each document on its own is packing it alone: rows overlap by one token.
    chunks = [pack_documents([d], seq_len) for d in docs]
    np.testing.assert_array_equal(rows.tokens, np.concatenate([c.tokens for c in chunks]))
    chunk_weights = np.concatenate([make_batch(c, np.arange(len(c)))["weights"] for c in chunks])
    np.testing.assert_array_equal(make_batch(rows, np.arange(len(rows)))["weights"], chunk_weights)


@pytest.mark.parametrize("stride", [1, 3, 4, 8])
def test_window_scores_every_token_after_bos_once_with_left_context(stride):
    seq_len = 8
    lengths = [1, 2, 5, 9, 10, 13, 31]
    docs = _numbered_docs(lengths)
    rows = window_documents(docs, seq_len, stride)
    assert (rows.doc_ids.max(axis=1) == rows.doc_ids[:, 0]).all()  # one document per row
    targets, context, inputs, r, c = _scored(rows)
    doc, index = np.divmod(targets, 1000)
    for d, n in enumerate(lengths):
        assert sorted(index[doc == d].tolist()) == list(range(1, n))  # BOS never, others once
    # Each target sees min(index, seq_len + 1 - stride) or more tokens of its own document.
    assert (context >= np.minimum(index, seq_len + 1 - stride)).all() and (context <= seq_len).all()
    for row, col, d, j, k in zip(r, c, doc, index, context, strict=True):
        np.testing.assert_array_equal(inputs[row, col + 1 - k : col + 1], docs[d][j - k : j])


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_window_of_a_short_document_is_one_row_scored_with_full_context(stride):
    docs = _numbered_docs([6, 9])  # both fit in one window of seq_len + 1 = 9 tokens
    rows = window_documents(docs, 8, stride)
    assert len(rows) == 2
    full = make_batch(pack_documents(docs[:1], 8), np.array([0]))
    batch = make_batch(rows, np.array([0]))
    for key, value in full.items():
        np.testing.assert_array_equal(batch[key], value)
    assert make_batch(rows, np.array([1]))["weights"].tolist() == [[1] * 8]


def test_window_rejects_strides_outside_one_to_seq_len():
    with pytest.raises(ValueError, match=r"stride must be in \[1, seq_len=8\], got 9"):
        window_documents(_numbered_docs([5]), 8, 9)


def test_truncate_keeps_each_documents_first_tokens_and_counts_what_it_drops():
    docs = _numbered_docs([1, 3, 9, 10, 20])
    rows, stats = rows_for(docs, 8, "truncate")
    assert rows.tokens.tolist() == [
        [BOS_ID, 1001, 1002] + [PAD_ID] * 6,
        [BOS_ID, *range(2001, 2009)],
        [BOS_ID, *range(3001, 3009)],
        [BOS_ID, *range(4001, 4009)],
    ]  # the lone BOS of document 0 has no target and gives no row
    assert rows.doc_ids[:, 0].tolist() == [2, 3, 4, 5] and rows.scored is None
    assert make_batch(rows, np.arange(4))["weights"].sum() == 2 + 8 * 3
    assert stats == RowStats(
        documents=5,
        rows=4,
        padding_fraction=6 / 32,
        scored_fraction=26 / 32,
        truncated_documents=2,
        dropped_tokens=1 + 11,
    )
    np.testing.assert_array_equal(truncate_documents(docs, 8).tokens, rows.tokens)


def test_rows_for_dispatches_and_reports_each_mode():
    docs = _random_docs(20, seed=2)
    packed, stats = rows_for(docs, 16, "pack")
    np.testing.assert_array_equal(packed.tokens, pack_documents(docs, 16).tokens)
    assert stats.truncated_documents == stats.dropped_tokens == 0 and stats.documents == 20
    assert stats.padding_fraction == packed.padding_fraction and stats.rows == len(packed)
    windows, stats = rows_for(docs, 16, "window")  # stride 0 means seq_len
    np.testing.assert_array_equal(windows.scored, window_documents(docs, 16, 16).scored)
    assert stats.scored_fraction * 16 * len(windows) == sum(len(d) - 1 for d in docs)
    assert stats.dropped_tokens == 0
    assert len(rows_for([], 16, "window")[0]) == len(rows_for([], 16, "truncate")[0]) == 0
    with pytest.raises(ValueError, match=r"packing must be 'pack', 'truncate' or 'window', got"):
        rows_for(docs, 16, "slide")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.packing=slide", "data.packing must be one of ['pack', 'truncate', 'window'], got"),
        ("data.stride=-1", "data.stride must not be negative, got -1."),
        ("data.stride=300", "data.stride=300 is longer than data.seq_len=256, so windows would"),
    ],
)
def test_packing_and_stride_config_errors(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_load_pretrain_data_windows_both_splits_and_reports_stats(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.txt").write_text(" ".join(["alpha beta gamma delta"] * 60) + "\n")
    config = DataConfig(
        source=str(corpus),
        data_dir=str(tmp_path / "data"),
        seq_len=32,
        batch_size=2,
        validation_fraction=0.2,
        packing="window",
        stride=8,
    )
    data = load_pretrain_data(config, tmp_path / "run", vocab_size=280)
    for rows, stats in (
        (data.train.table, data.train_stats),
        (data.validation, data.validation_stats),
    ):
        assert rows.scored is not None and stats.rows == len(rows) > 0
        assert stats.scored_fraction < 0.5  # windows 8 tokens apart score about 8 of 32 targets


def test_pretrain_data_keeps_a_gcs_run_dir_intact(monkeypatch, tmp_path):
    from lm.data import pipeline

    seen = {}

    def fake_resolve(run_dir, *args):
        seen["run_dir"] = run_dir
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "resolve_tokenizer", fake_resolve)
    monkeypatch.setattr(pipeline, "load_documents", lambda *a: {"train": ["x"]})
    with pytest.raises(RuntimeError, match="stop here"):
        pipeline.load_pretrain_data(DataConfig(), "gs://bucket/run", vocab_size=300)
    assert str(seen["run_dir"]) == "gs://bucket/run"
