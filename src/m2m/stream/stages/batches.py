"""The source stage: which rows each item of this reader holds, from the rank's epoch order."""

from __future__ import annotations

from typing import Sequence

from m2m.stream import partition
from m2m.stream.columns import Column
from m2m.stream.order import RankEpoch
from m2m.stream.stages.base import Stage, Work
from m2m.stream.stages.cold import fill_common
from m2m.stream.topology import World


class BatchStage(Stage):
    """Yields this worker's items (runs of ``chunk_batches`` batches) of ``plan`` (one rank's epoch),
    from batch ``start`` on."""

    def __init__(self, plan: RankEpoch, epoch: int, start: int, world: World, chunk_batches: int,
                 lookahead_rows: int = 0) -> None:
        self._plan = plan
        self._epoch = epoch
        self._lookahead = lookahead_rows
        self._next = 0
        self._items = partition.worker_items(plan.num_batches, start, chunk_batches, world.worker, world.num_workers)

    def __next__(self) -> Work:
        if self._next >= len(self._items):
            raise StopIteration
        _, first, end = (int(v) for v in self._items[self._next])
        self._next += 1
        lo, hi = self._plan.batch_range(first, end)
        weights = None if self._plan.weights is None else self._plan.weights[lo:hi]
        ahead = None
        if self._lookahead:
            ahead = self._plan.rows[lo + self._lookahead: hi + self._lookahead]
        return Work(self._epoch, first, end, self._plan.rows[lo:hi], weights, ahead)

    def shutdown(self) -> None:
        self._items = self._items[:0]


class RowsStage(Stage):
    """Adds only the rows and weights of each item (the device gathers the rest)."""

    def __init__(self, upstream: Stage, columns: Sequence[Column]) -> None:
        self.upstream = upstream
        self.columns = tuple(columns)

    def __next__(self) -> Work:
        assert self.upstream is not None
        work = next(self.upstream)
        fill_common(work, self.columns)
        return work
