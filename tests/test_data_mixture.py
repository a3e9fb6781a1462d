"""`data.mixture`: weighted rows per batch, a pure function of (seed, step, slot)."""

import numpy as np
import pytest

from lm.config import ConfigError, load_config, mixture_components
from lm.data.batches import ArrayTable, ordered_batches
from lm.data.mixture import ConcatTable, MixtureBatcher, quotas


def _table(source: int, rows: int) -> ArrayTable:
    """Rows whose `inputs` say which source and row they are: [source, row, row, row]."""
    ids = np.arange(rows)
    inputs = np.stack([np.full(rows, source), ids, ids, ids], axis=1).astype(np.int32)
    return ArrayTable({"inputs": inputs, "weights": np.ones((rows, 4), np.float32)})


def _mixture(batch: int = 8, seed: int = 3) -> MixtureBatcher:
    tables = [_table(1, 40), _table(2, 13), _table(3, 7)]
    return MixtureBatcher(tables, [0.5, 0.25, 0.25], batch, seed, ["a", "b", "c"])


def test_quotas_fill_the_batch_by_largest_remainder():
    assert quotas([0.5, 0.25, 0.25], 8) == [4, 2, 2]
    assert quotas([1, 1, 1], 8) == [3, 3, 2]
    assert quotas([0.8, 0.2], 256) == [205, 51]
    assert sum(quotas([0.7, 0.2, 0.1], 33)) == 33


def test_every_batch_holds_each_sources_share():
    mixture = _mixture()
    for step in range(20):
        sources = mixture.local_batch(step, 0, 1)["inputs"][:, 0]
        assert sorted(sources.tolist()) == [1, 1, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_read_slices_of_the_one_process_batch(processes):
    mixture = _mixture()
    for step in (0, 5, 17):
        whole = mixture.local_batch(step, 0, 1)
        parts = [mixture.local_batch(step, p, processes) for p in range(processes)]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_a_fresh_mixture_resumes_with_the_same_batches():
    first, resumed = _mixture(), _mixture()
    for step in (9, 3, 40):
        a, b = first.local_batch(step, 0, 1), resumed.local_batch(step, 0, 1)
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    other = _mixture(seed=4)
    assert not np.array_equal(
        other.local_batch(9, 0, 1)["inputs"], first.local_batch(9, 0, 1)["inputs"]
    )


def test_each_source_is_read_without_repeats_within_its_epoch():
    mixture = _mixture()
    seen = {1: [], 2: [], 3: []}
    for step in range(10):  # source 1: 40 rows at 4 a step = one epoch
        for source, row in mixture.local_batch(step, 0, 1)["inputs"][:, :2]:
            seen[int(source)].append(int(row))
    assert sorted(seen[1]) == list(range(40))
    assert sorted(seen[3][:7]) == list(range(7))  # 2 a step: 7 rows then the next epoch


def test_mixture_errors_name_the_source_and_the_fix():
    with pytest.raises(ValueError, match=r"weight 0.01 of b is less than one row of a global"):
        MixtureBatcher([_table(1, 40), _table(2, 40)], [0.99, 0.01], 8, 0, ["a", "b"])
    with pytest.raises(ValueError, match=r"source b has 3 examples, fewer than its 4 rows"):
        MixtureBatcher([_table(1, 40), _table(2, 3)], [0.5, 0.5], 8, 0, ["a", "b"])


def test_mixture_config_parses_directories_and_normalises_weights():
    assert mixture_components("gs://b/c4=3,/data/wiki=1") == [
        ("gs://b/c4", 0.75),
        ("/data/wiki", 0.25),
    ]
    with pytest.raises(ConfigError, match="entry 'gs://b/c4' is not DIR=WEIGHT"):
        load_config(None, ["data.mixture=gs://b/c4,/w=1"])
    with pytest.raises(ConfigError, match="entry '/w=0' is not DIR=WEIGHT with a positive"):
        load_config(None, ["data.mixture=/v=1,/w=0"])


def test_concatenated_tables_evaluate_every_row_once_with_padding():
    concat = ConcatTable([_table(1, 3), _table(2, 0), _table(3, 2)])
    assert len(concat) == 5
    batches = list(ordered_batches(concat, 4))
    inputs = np.concatenate([b["inputs"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    assert inputs[:5, :2].tolist() == [[1, 0], [1, 1], [1, 2], [3, 0], [3, 1]]
    assert weights[5:].sum() == 0 and weights[:5].all()
