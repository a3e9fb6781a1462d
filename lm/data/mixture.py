"""Weighted mixtures of row tables, batched by step: `data.mixture`.

Every global batch holds a fixed number of rows from each source, its weight times the batch
(largest remainder, so the shares add up to the batch). Source k's rows come from its own
`StepBatcher` (epochs of a permutation seeded by (seed, k)), and a permutation seeded by
(seed, step) spreads them over the batch's slots; so the row in slot j of step N is a pure
function of (seed, N, j), the same for any process count and after a resume, and each source
is read without repeats until all its rows have been seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lm.data.batches import Batch, StepBatcher, Table, process_rows

_SLOTS_STREAM = 0x6D6978  # "mix": keeps the slot permutation apart from other seeded draws


def quotas(weights: Sequence[float], global_batch: int) -> list[int]:
    """Rows of each source in a batch: weight × batch, remainders to the largest fractions."""
    total = sum(weights)
    exact = [w / total * global_batch for w in weights]
    rows = [int(e) for e in exact]
    by_fraction = sorted(range(len(exact)), key=lambda k: (rows[k] - exact[k], k))
    for k in by_fraction[: global_batch - sum(rows)]:
        rows[k] += 1
    return rows


class MixtureBatcher:
    """Training batches mixing `tables` by `weights`, indexed by step like `StepBatcher`."""

    def __init__(
        self,
        tables: Sequence[Table],
        weights: Sequence[float],
        global_batch: int,
        seed: int,
        names: Sequence[str],
    ):
        self.tables, self.names, self.global_batch, self.seed = tables, names, global_batch, seed
        self.quotas = quotas(weights, global_batch)
        for name, weight, rows, table in zip(names, weights, self.quotas, tables, strict=True):
            if not rows:
                raise ValueError(
                    f"data.mixture weight {weight:g} of {name} is less than one row of a global "
                    f"batch of {global_batch}; raise the weight or data.batch_size."
                )
            if len(table) < rows:
                raise ValueError(
                    f"data.mixture source {name} {table.describe()}, fewer than its {rows} rows "
                    "of each batch; lower its weight or data.batch_size, or add data."
                )
        self.sources = [
            StepBatcher(table, rows, seed + k)
            for k, (table, rows) in enumerate(zip(tables, self.quotas, strict=True))
        ]

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, row) of each slot of the global batch at `step`."""
        source = np.repeat(np.arange(len(self.sources)), self.quotas)
        rows = np.concatenate([s.indices(step) for s in self.sources])
        slots = np.random.default_rng([self.seed, step, _SLOTS_STREAM]).permutation(len(rows))
        return source[slots], rows[slots]

    def local_batch(
        self, step: int, process_index: int | None = None, process_count: int | None = None
    ) -> Batch:
        """This process's contiguous share of the global batch at `step`: only its rows are read."""
        mine = process_rows(self.global_batch, process_index, process_count)
        source, rows = (a[mine] for a in self.indices(step))
        parts = {k: self.tables[k].take(rows[source == k]) for k in np.unique(source)}
        return _interleave(parts, source)

    def describe(self, seq_len: int, steps: int) -> list[str]:
        """One line per source: its share of each batch and the tokens it feeds the run."""
        return [
            f"mixture: {name}: {rows}/{self.global_batch} rows a step "
            f"({rows / self.global_batch:.1%}), {rows * seq_len * steps:,} tokens over "
            f"{steps:,} steps, from {len(table):,} rows "
            f"({rows * steps / max(len(table), 1):.2f} epochs)"
            for name, rows, table in zip(self.names, self.quotas, self.tables, strict=True)
        ]


class ConcatTable:
    """Several tables' rows one after another (a mixture's validation splits, evaluated whole)."""

    def __init__(self, tables: Sequence[Table]):
        self.tables = [t for t in tables if len(t)] or list(tables[:1])
        self.starts = np.cumsum([0, *(len(t) for t in self.tables)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def describe(self) -> str:
        return f"holds {len(self)} rows"

    def take(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, np.int64)
        table = np.searchsorted(self.starts, indices, side="right") - 1
        table = np.where(indices >= 0, table, 0)  # padding rows ride along with table 0's
        parts = {
            k: self.tables[k].take(np.where(indices >= 0, indices - self.starts[k], -1)[table == k])
            for k in np.unique(table)
        }
        return _interleave(parts, table)


def _interleave(parts: dict[int, Batch], owner: np.ndarray) -> Batch:
    """One batch whose rows where `owner == k` are `parts[k]`'s rows, in order."""
    first = next(iter(parts.values()))
    batch = {key: np.empty((len(owner), *v.shape[1:]), v.dtype) for key, v in first.items()}
    for k, part in parts.items():
        for key, values in part.items():
            batch[key][owner == k] = values
    return batch
