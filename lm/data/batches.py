"""Batches by index over any random-access table of rows (packed token rows, encoded examples).

`StepBatcher` gives the training batch at step N as a pure function of (table, seed, N): a new
row permutation every epoch, no hidden state, so a resumed run and every process count see the
same rows. `ordered_batches` walks a table in order for evaluation, filling the last batch with
padding rows (index -1) that carry no weight. Each process takes its contiguous share of a
global batch (`process_rows`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import grain
import jax
import numpy as np

Batch = dict[str, np.ndarray]


class Table(Protocol):
    """Rows addressable by index; `take` turns index -1 into a padding row of weight 0."""

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> Batch: ...

    def describe(self) -> str:
        """How many rows, for error messages: e.g. 'packs into 3 rows of 17 tokens'."""
        ...


def process_rows(
    global_rows: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """This process's contiguous slice of `global_rows` rows."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_rows % count:
        raise ValueError(
            f"data.batch_size={global_rows} must divide evenly over {count} processes."
        )
    per = global_rows // count
    return slice(index * per, (index + 1) * per)


def local_rows(batch: Batch) -> Batch:
    """This process's share of a global host batch."""
    mine = process_rows(len(next(iter(batch.values()))))
    return {k: v[mine] for k, v in batch.items()}


class StepBatcher:
    """Training batches indexed by step: a new row permutation each epoch, no hidden state."""

    def __init__(self, table: Table, global_batch: int, seed: int, shuffle: bool = True):
        if len(table) < global_batch:
            raise ValueError(
                f"The training split {table.describe()}, fewer than one global batch of "
                f"{global_batch}; lower data.batch_size, or add data."
            )
        self.table, self.global_batch, self.seed = table, global_batch, seed
        order = grain.MapDataset.range(len(table))
        # Grain's random-access shuffle gives index i of epoch e at e * len + i, permuted anew
        # for every epoch from the seed alone.
        self._order = order.seed(seed).shuffle() if shuffle else order

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per pass over the rows (the remainder rows wait a pass)."""
        return len(self.table) // self.global_batch

    def indices(self, step: int) -> np.ndarray:
        """Row indices of the global batch at `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = epoch * len(self.table) + within * self.global_batch
        return np.array([self._order[start + i] for i in range(self.global_batch)], np.int64)

    def local_batch(
        self, step: int, process_index: int | None = None, process_count: int | None = None
    ) -> Batch:
        """This process's contiguous share of the global batch at `step`."""
        mine = process_rows(self.global_batch, process_index, process_count)
        return self.table.take(self.indices(step)[mine])


def ordered_batches(table: Table, batch_size: int, max_batches: int = 0) -> Iterator[Batch]:
    """Rows in order, `batch_size` at a time (the first `max_batches` when > 0); the last batch
    is filled with padding rows."""
    count = -(-len(table) // batch_size)
    for b in range(min(count, max_batches) if max_batches else count):
        indices = np.arange(b * batch_size, (b + 1) * batch_size)
        yield table.take(np.where(indices < len(table), indices, -1))


class ArrayTable:
    """Encoded examples as a table: one row per example of equal-length arrays; padding rows
    are all zeros (weight 0)."""

    def __init__(self, arrays: Batch):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def describe(self) -> str:
        return f"has {len(self)} examples"

    def take(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices)
        real = indices >= 0
        safe = np.maximum(indices, 0)
        return {
            k: np.where(real.reshape(-1, *[1] * (v.ndim - 1)), v[safe], np.zeros((), v.dtype))
            for k, v in self.arrays.items()
        }
