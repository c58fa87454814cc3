"""Split one epoch's order over ranks, into batches, and batches over DataLoader workers.

Pure functions of sizes and the topology numbers:

* ranks take contiguous equal slices of the epoch order (contiguous keeps a block-shuffled
  window on few ranks). Without ``drop_last`` the order is padded by repeating its first rows
  until it splits evenly (fewer than ``world_size`` extra rows); with ``drop_last`` every rank
  keeps the same whole number of batches and the rest (fewer than ``world_size * batch_size``
  rows) is dropped. Either way every rank yields the same number of batches of the same sizes,
  so DDP collectives never wait on a rank that ran out.
* a rank's rows are cut into batches in order; only the last may be short (not ``drop_last``).
* a run that starts at batch ``start`` (a resume point) groups the remaining batches into
  items of ``chunk_batches`` consecutive batches; item ``i`` goes to worker ``i % num_workers``.
  The DataLoader polls workers round-robin, so items (and batches) reach the consumer in
  order whatever ``num_workers`` is: the batch sequence does not depend on the worker count.
"""

from __future__ import annotations

import numpy as np

from m2m.errors import ConfigError


def rows_per_rank(num_entries: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """How many order positions each rank reads in one epoch."""
    if drop_last:
        return (num_entries // (world_size * batch_size)) * batch_size
    return -(-num_entries // world_size)


def rank_positions(num_entries: int, batch_size: int, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """Positions into the epoch order (int64) that ``rank`` reads, padding wrapped from the start."""
    per = rows_per_rank(num_entries, batch_size, world_size, drop_last)
    pos = np.arange(rank * per, (rank + 1) * per, dtype=np.int64)
    if num_entries and per and pos[-1] >= num_entries:
        pos %= num_entries
    return pos


def num_batches(rows: int, batch_size: int, drop_last: bool) -> int:
    """Batches in ``rows`` rows."""
    return rows // batch_size if drop_last else -(-rows // batch_size)


def batch_bounds(first: int, last: int, rows: int, batch_size: int) -> tuple[int, int]:
    """Row range ``[lo, hi)`` of batches ``first..last-1`` within a rank's ``rows`` rows."""
    return first * batch_size, min(last * batch_size, rows)


def worker_items(total_batches: int, start: int, chunk_batches: int, worker: int, num_workers: int) -> np.ndarray:
    """``[k, 3]`` int64 rows ``(item, first_batch, end_batch)`` that ``worker`` produces after ``start``."""
    if chunk_batches < 1:
        raise ConfigError(f"chunk_batches must be >= 1, got {chunk_batches}")
    remaining = max(0, total_batches - start)
    n_items = -(-remaining // chunk_batches)
    item = np.arange(worker, n_items, num_workers, dtype=np.int64)
    first = start + item * chunk_batches
    end = np.minimum(first + chunk_batches, total_batches)
    return np.stack([item, first, end], axis=1) if len(item) else np.zeros((0, 3), dtype=np.int64)
