"""Spare core: while the consumer waits for the prefetch thread, a helper thread shares its row gathers.

The prefetch thread runs torch on ``intra_op_threads`` threads (1 by default) so that it does not
compete with the consumer's own work, a training step. While the consumer is blocked waiting for the
item being made (it asked for the next item and none was ready), its core is idle: the item's row
gathers (`index_select` from the warm arena or from in-memory shards) are then shared with a helper
thread, which gathers the second half of the rows left. A random-row gather is bound by memory
latency: two threads, each gathering half, ran it 1.7-1.9x faster than one on this project's 2-core VM,
and a helper taking half of each 1,600-row item 1.3-1.45x (the hand-over costs; docs/tuning.md).

A helper thread, not OpenMP: torch's OpenMP threads keep spinning for a while after a parallel region,
and in a measured balanced stream (a consumer as fast as the loader) the spinning cost the consumer
more than the wider gathers gave (docs/tuning.md). The helper waits on a queue. The halves are copies
into disjoint rows of the output, so who gathers which cannot change a value.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch

PIECE_BYTES = 1 << 20  # rows gathered between two looks at whether the consumer waits
# gathers from smaller tables run from the CPU caches, where waking the helper costs more than it saves
# (the demo's 8 MB lake streamed 0.7x as fast with it, docs/tuning.md)
MIN_TABLE_BYTES = 64 << 20

_local = threading.local()


LOADER_BOUND = 0.5  # share of its time the consumer waited, over the last items, above which it helps
DECAY = 0.8  # weight of the earlier items in that share


class ConsumerWaits:
    """Whether the consumer waits for the producer now, and the share of its time it waited over the last
    items (a moving average). A helper is worth its hand-over only when the stream is loader-bound: a
    consumer about as fast as the loader waits briefly, often mid-item, and sharing those gathers cost
    it 5-12% in a measured balanced stream (docs/tuning.md)."""

    def __init__(self) -> None:
        self.now = threading.Event()  # set while the consumer waits for an item (none was ready)
        self.share = 1.0  # a new stream starts loader-bound (its first items wait for the first reads)
        self._last: float | None = None

    def took(self, stall: float, at: float) -> None:
        """The consumer took an item at ``at`` (perf_counter) after waiting ``stall`` seconds for it."""
        if self._last is not None and at > self._last:
            self.share = DECAY * self.share + (1 - DECAY) * min(1.0, stall / (at - self._last))
        self._last = at

    def loader_bound(self) -> bool:
        """Whether the consumer waited for more than ``LOADER_BOUND`` of its time over the last items."""
        return self.share >= LOADER_BOUND

    def __call__(self) -> bool:
        """Whether to share a gather now: the consumer waits, and the stream is loader-bound."""
        return self.now.is_set() and self.loader_bound()


class Spare:
    """The helper of one producer thread: ``waiting()`` says whether to share a gather now (the consumer
    waits and the stream is loader-bound: `ConsumerWaits`)."""

    def __init__(self, waiting: Callable[[], bool], worth_it: Callable[[], bool] = lambda: True,
                 threads: int | None = 1) -> None:
        self.waiting = waiting
        self.threads = threads  # torch threads of the helper (the producer's)
        self.worth_it = worth_it  # False: gathers are not cut into pieces at all (a consumer-bound stream)
        self.handed = 0  # hand-overs so far (tests, benchmarks)
        self._tasks: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._done: "queue.SimpleQueue[BaseException | None]" = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.busy = False

    def _run(self) -> None:
        # the producer's torch thread count: a new thread would take the process-wide one (which another
        # stream's producer may have restored meanwhile), and run OpenMP teams beside the consumer
        saved = torch.get_num_threads()
        if self.threads and self.threads != saved:
            torch.set_num_threads(self.threads)
        try:
            self._serve()
        finally:
            if torch.get_num_threads() != saved:
                torch.set_num_threads(saved)

    def _serve(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            try:
                torch.index_select(task[0], 0, task[1], out=task[2])
                result: BaseException | None = None
            except BaseException as exc:  # noqa: BLE001 - handed to the producer, which raises it
                result = exc
            del task  # hold no tensor while idle
            self._done.put(result)

    def hand(self, src: torch.Tensor, pos: torch.Tensor, out: torch.Tensor) -> None:
        """``out = src[pos]`` on the helper thread; `collect` waits for it."""
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="m2m-spare", daemon=True)
            thread.start()  # assigned once started: a thread that failed to start is never joined
            self._thread = thread
        self.busy = True
        self.handed += 1
        self._tasks.put((src, pos, out))

    def collect(self) -> None:
        """Wait for the rows handed over (if any); raise what their gather raised."""
        if self.busy:
            self.busy = False
            exc = self._done.get()
            if exc is not None:
                raise exc

    def close(self) -> None:
        """Stop the helper thread (after collecting)."""
        if self._thread is not None:
            self._tasks.put(None)
            self._thread.join()
            self._thread = None


def lend(spare: Spare | None) -> None:
    """Bind ``spare`` to this (producer) thread's gathers; None unbinds."""
    _local.spare = spare


def index_select(src: torch.Tensor, pos: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.index_select(src, 0, pos, out=out)``. On a producer thread, once the consumer waits
    (asked again every ``PIECE_BYTES`` of rows), the helper gathers the second half of the rows left
    while this thread gathers the first: one hand-over per call (waking the helper costs about as much
    as gathering a small piece, measured)."""
    spare: Spare | None = getattr(_local, "spare", None)
    if spare is None:  # not a producer thread (the consumer, a worker): nothing else to work out
        return torch.index_select(src, 0, pos, out=out)
    step = max(1, PIECE_BYTES // max(1, out[:1].numel() * out.element_size()))
    if len(pos) < 2 * step or src.numel() * src.element_size() < MIN_TABLE_BYTES or not spare.worth_it():
        return torch.index_select(src, 0, pos, out=out)  # one call: pieces cost a few percent
    lo, end = 0, len(pos)
    try:
        while lo < end:
            if not spare.busy and end - lo >= 2 * step and spare.waiting():
                mid = lo + (end - lo) // 2
                spare.hand(src, pos[mid:end], out[mid:end])
                end = mid
            hi = min(lo + step, end)
            torch.index_select(src, 0, pos[lo:hi], out=out[lo:hi])
            lo = hi
    finally:
        spare.collect()
    return out
