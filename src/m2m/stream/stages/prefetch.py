"""Prefetch: runs the upstream stages in a background thread, ``capacity`` items ahead.

Failures travel on the queue and are re-raised in the consumer as `StreamError` (cause chained)
within one poll interval; every ``put``/``get`` waits with a timeout and re-checks the stop flag
and the producer's liveness; `shutdown` stops and joins the thread. The thread holds no reference
to the `Prefetcher`, so an abandoned prefetcher is collected and its thread told to stop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from typing import Any

import torch

from m2m.errors import (
    CacheTimeoutError,
    ConfigError,
    CorruptShardError,
    LakeClosedError,
    ObjectStoreError,
    PathNotFoundError,
    StreamError,
    describe,
)
from m2m.stream.stages import spare
from m2m.stream.stages.base import Stage, Work

log = logging.getLogger(__name__)

POLL_S = 0.05
JOIN_TIMEOUT_S = 10.0


# observed: a paused store surfaced as StreamError with 0 workers, ObjectStoreError with 2
LAKE_IO_ERRORS = (CorruptShardError, PathNotFoundError, ObjectStoreError, CacheTimeoutError, LakeClosedError)


def stage_failure(exc: BaseException, what: str) -> BaseException:
    """The error a stage failure reaches the consumer as, whichever thread ran the stage: the lake's
    own I/O errors (a damaged shard, a remote one missing from its store, a store that failed after its
    bounded retries, a node cache with no room in time, a private node cache removed by close) as themselves, so callers catch them by what
    they are whether the stream's prefetch thread or a DataLoader worker's main thread met them, and a
    stage's own `StreamError` as itself; anything else as `StreamError` with the cause chained (raise
    the result ``from exc``)."""
    if isinstance(exc, (*LAKE_IO_ERRORS, StreamError)):   # (a stage's own StreamError says what failed)
        return exc
    return StreamError(f"{what} failed: {describe(exc)}")


class _End:
    pass


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: "queue.Queue[Any]", item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(upstream: Stage, q: "queue.Queue[Any]", stop: threading.Event, threads: int | None,
             helper: spare.Spare | None) -> None:
    saved = None
    if threads:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)  # OpenMP: per thread; restored below for threads started later
    spare.lend(helper)  # while the consumer waits for the item being made, a helper shares its gathers
    try:
        while not stop.is_set():
            try:
                work = next(upstream)
            except StopIteration:
                _put(q, _End(), stop)
                return
            if not _put(q, work, stop):
                return
    except BaseException as exc:  # noqa: BLE001 - every failure is handed to the consumer, none is hidden
        _put(q, _Failure(exc), stop)
    finally:
        spare.lend(None)
        if helper is not None:
            helper.close()
        if saved is not None:
            torch.set_num_threads(saved)


def _stop(stop: threading.Event) -> None:
    stop.set()


class Prefetcher(Stage):
    """Keeps up to ``capacity`` items of ``upstream`` ready, from `start` until `shutdown`.

    ``intra_op_threads``: torch threads of the producer thread (1 avoids OpenMP contention with the
    consumer; None leaves torch's setting alone). While the consumer waits for an item (none was
    ready when it asked), a helper thread shares the item's row gathers (`m2m.stream.stages.spare`).
    """

    def __init__(self, upstream: Stage, capacity: int = 2, intra_op_threads: int | None = 1,
                 name: str = "m2m-prefetch") -> None:
        if capacity < 1:
            raise ConfigError(f"prefetch capacity must be >= 1, got {capacity}")
        self.upstream = upstream
        self.capacity = capacity
        self.intra_op_threads = intra_op_threads
        self.name = name
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=capacity)
        self._waits = spare.ConsumerWaits()
        self.spare: spare.Spare | None = None  # the producer's gather helper (`m2m.stream.stages.spare`)
        self._done = True

    def start(self) -> "Prefetcher":
        """Start the producer thread (once); returns self."""
        if self._thread is not None:
            return self
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.capacity)
        self._done = False
        # torch's thread count left alone (None): no helper either, whose gathers would add a thread
        self._waits = spare.ConsumerWaits()
        self.spare = (spare.Spare(self._waits, self._waits.loader_bound, self.intra_op_threads)
                      if self.intra_op_threads else None)
        self._thread = threading.Thread(target=_produce, name=self.name, daemon=True,
                                        args=(self.upstream, self._queue, self._stop, self.intra_op_threads,
                                              self.spare))
        self._finalizer = weakref.finalize(self, _stop, self._stop)
        self._thread.start()
        return self

    def __next__(self) -> Work:
        if self._done:
            raise StopIteration
        start = time.perf_counter()
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            item = self._wait()
        now = time.perf_counter()
        stall = now - start
        self._waits.took(stall, now)
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            self.shutdown()
            raise stage_failure(item.exc, f"{self.name}: a stream stage") from item.exc
        item.count("stall_s", stall)
        return item

    def _wait(self) -> Any:
        """The next item, once the producer made it: the consumer's core is the producer's meanwhile."""
        self._waits.now.set()
        try:
            while True:
                try:
                    return self._queue.get(timeout=POLL_S)
                except queue.Empty:
                    if self._thread is None or not self._thread.is_alive():
                        if self._queue.empty():
                            self._done = True
                            raise StreamError(f"{self.name}: producer thread ended without a result") from None
        finally:
            self._waits.now.clear()

    def backlog(self) -> int:
        """Items produced and not yet taken by the consumer (0: the consumer is waiting or about to)."""
        return self._queue.qsize()

    def shutdown(self) -> None:
        """Stop the producer, drop pending items, join the thread, then shut the upstream down."""
        thread, self._thread = self._thread, None
        self._done = True
        if thread is None:
            return
        self._stop.set()
        deadline = time.perf_counter() + JOIN_TIMEOUT_S
        while thread.is_alive() and time.perf_counter() < deadline:
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=POLL_S)
        if thread.is_alive():
            log.warning("%s: producer still inside a stage call after %.0f s; left to finish (daemon)",
                        self.name, JOIN_TIMEOUT_S)
            return
        if self.upstream is not None:
            self.upstream.shutdown()
