"""The source stage: which rows each item of this reader holds, from the rank's epoch order."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from m2m.stream import partition
from m2m.stream.columns import Column
from m2m.stream.order import RankEpoch
from m2m.stream.stages.base import Stage, Work
from m2m.stream.stages.cold import fill_common
from m2m.stream.topology import World


class BatchStage(Stage):
    """Yields this worker's items (runs of ``chunk_batches`` batches) of one epoch, from ``start`` on.

    State: ``{"epoch", "start", "next"}`` — the epoch, the batch the run began at (a resume
    point), and how many of this worker's items were already produced. Nothing is planned before
    ``reset`` (the epoch's order is the expensive part, and ``reset`` says which epoch).
    """

    def __init__(self, epoch_fn: Callable[[int], RankEpoch], world: World, chunk_batches: int,
                 lookahead_rows: int = 0) -> None:
        self._epoch_fn = epoch_fn
        self._world = world
        self._chunk = chunk_batches
        self._lookahead = lookahead_rows
        self._epoch = self._start = self._next = 0
        self._plan: RankEpoch | None = None
        self._items = partition.worker_items(0, 0, chunk_batches, world.worker, world.num_workers)

    def reset(self, state: dict[str, Any] | None = None) -> None:
        state = state or {"epoch": 0, "start": 0, "next": 0}
        self._epoch = int(state["epoch"])
        self._start = int(state["start"])
        self._next = int(state["next"])
        self._plan = self._epoch_fn(self._epoch)
        self._items = partition.worker_items(self._plan.num_batches, self._start, self._chunk,
                                             self._world.worker, self._world.num_workers)

    def __next__(self) -> Work:
        if self._next >= len(self._items):
            raise StopIteration
        _, first, end = (int(v) for v in self._items[self._next])
        self._next += 1
        assert self._plan is not None
        lo, hi = self._plan.batch_range(first, end)
        weights = None if self._plan.weights is None else self._plan.weights[lo:hi]
        ahead = None
        if self._lookahead:
            ahead = self._plan.rows[lo + self._lookahead: hi + self._lookahead]
        return Work(self._epoch, first, end, self._plan.rows[lo:hi], weights, ahead)

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "start": self._start, "next": self._next}

    def shutdown(self) -> None:
        self._items = self._items[:0]


class RowsStage(Stage):
    """Adds only the rows and weights of each item (the device gathers the rest)."""

    def __init__(self, upstream: Stage, columns: Sequence[Column]) -> None:
        self.upstream = upstream
        self.columns = tuple(columns)

    def __next__(self) -> Work:
        work = next(self.upstream)
        fill_common(work, self.columns)
        return work
