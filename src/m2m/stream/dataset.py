"""`StreamDataset` (public as `m2m.M2MDataLake`): one rank's epoch order, the items a DataLoader
worker produces, and one whole epoch of batches when iterated alone.

Its stage chains are assembled by `m2m.stream.pipeline` (roles WORKER and INLINE).
"""

from __future__ import annotations

import dataclasses
import multiprocessing.util
import os
import threading
from concurrent.futures import CancelledError, Executor, Future
from typing import Any, Callable, Iterator, NoReturn

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from m2m.errors import ConfigError, M2MError, StreamError
from m2m.sampling.plan import PlanSampler, accepts_num_draws, supports_priorities
from m2m.sampling.samplers import ImportanceSampler
from m2m.sampling.sharded import ShardedImportance, ShardedPlanSampler
from m2m.stream import affinity, partition, transport
from m2m.stream import pipeline as pl
from m2m.stream.metrics import StreamStats
from m2m.stream.order import RankEpoch, delivered_draws, rank_epoch, sampler_plan
from m2m.stream.source import PrefetchPlanning, RowSource
from m2m.stream.spec import StreamSpec
from m2m.stream.stages.base import Work
from m2m.stream.stages.hot import POOLING
from m2m.stream.topology import World, detect_rank, detect_worker

REFUSED = ("the stream's dataset is iterated by the loader export_to_dataloader/make_loader returned (it is "
           "stateful itself: dl.state_dict() / dl.load_state_dict()), or alone (one epoch of batches); "
           "wrapping dl.dataset in another DataLoader or torchdata's StatefulDataLoader is not supported")


#: Held while a loader sets a pass's numbers on its dataset and starts (forks or pickles) its workers:
#: passes of one loader started from several threads at once
STARTING_WORKERS = threading.Lock()


class StreamDataset(Dataset[Any]):
    """The dataset of a `StreamLoader` (``dl.dataset``; public as ``m2m.M2MDataLake``).

    ``len(dataset)`` is the number of rows one rank reads in an epoch (the DDP topology read now).
    Iterated alone (``for batch in dl.dataset``) it yields one epoch (``dataset.epoch``) of the
    loader's batches. It is not a ``torch.utils.data.IterableDataset`` on purpose: the loader is
    sized (``len(dl)`` batches), and Lightning warns about every sized loader over an
    ``IterableDataset``; the loader still runs it as an iterable-style dataset in its workers.
    """

    def __init__(self, source: RowSource, spec: StreamSpec, delivery: pl.Delivery,
                 sampler: PlanSampler | None = None) -> None:
        super().__init__()
        self.source = source
        self.spec = spec
        self.delivery = delivery
        self.sampler = sampler
        self.epoch = 0
        self.start = 0
        self.world = World(0 if spec.rank is None else spec.rank, 1 if spec.world_size is None else spec.world_size)
        # persistent DataLoader workers keep their copy of this object: the loader writes each
        # iteration's (epoch, start, rank, world_size) into this shared-memory tensor instead
        self.control: torch.Tensor | None = None
        self._worker_side = False  # True only in the copy the loader's own workers receive
        self._worker_res: pl.Resources | None = None  # a persistent worker's, kept across its passes
        # shared buffers per worker that carry its items (`m2m.stream.transport`; 0: torch's own
        # transport, e.g. when torch pins the items); the worker's ring, and the consumer's views of
        # the rings of persistent workers, live as long as those workers
        self.ring_slots = 0
        self._ring: transport.SlotRing | None = None
        self._views: transport.SlotViews | None = None
        self._cache: dict[tuple[int, int, int], RankEpoch] = {}
        self._ahead: dict[tuple[int, int, int], "Future[RankEpoch]"] = {}  # at most one epoch planned ahead (`plan_ahead`)
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def current_world(self) -> World:
        """The DDP topology now: the spec's explicit values, else torch.distributed / torchrun's env."""
        return detect_rank(self.spec.rank, self.spec.world_size)

    def rank_epoch(self, epoch: int, world: World | None = None) -> RankEpoch:
        """The rows and weights ``world``'s rank reads in ``epoch`` (the last two are cached; one
        computed ahead by `plan_ahead` is taken from there, its error raised here)."""
        world = self.world if world is None else world
        key = (epoch, world.rank, world.world_size)
        with self._guard():
            hit = self._cache.get(key)
            pending = self._ahead.pop(key, None) if hit is None else None
        if hit is None:
            hit = None if pending is None else self._finished(pending)
            if hit is None:
                hit = self.compute_epoch(epoch, world)
            with self._guard():
                while len(self._cache) >= 2:  # two passes may interleave (zip(dl, dl))
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = hit
            src = self.source
            if isinstance(src, PrefetchPlanning) and src.is_remote:  # node cache: download ahead in first-use order
                src.plan_prefetch(affinity.first_use(hit.rows, src.shard_offsets).tolist())
        return hit

    def num_batches(self, epoch: int, world: World | None = None) -> int:
        """Batches per rank of ``epoch``. A loss sampler's plan is not drawn for it: that plan takes the
        priorities as they are when its pass starts, and counting (``len(dl)``) or saving
        (``state_dict()``) an epoch ahead must not freeze them earlier; its count does not depend on
        the plan (exactly the delivered draws, `m2m.stream.order.delivered_draws`)."""
        world = self.world if world is None else world
        s = self.spec
        if supports_priorities(self.sampler):
            # with or without shard affinity a plan's batch count is that of its length (`affinity.rank_epoch`;
            # a per-shard plan's shard counts sum to it, `affinity.rank_epoch_sharded`); a mixture's plan has
            # a fixed length (with affinity, a mixture or a per-shard loss plan, len(dl) froze the next
            # epoch's priorities before the loop fed its losses back: observed)
            fixed = getattr(self.sampler, "plan_length", None)
            m = (delivered_draws(s.num_rows, s.batch_size, world.world_size, s.drop_last)
                 if accepts_num_draws(self.sampler) else None if fixed is None else int(fixed()))
            if m is not None:
                return partition.num_batches(partition.rows_per_rank(m, s.batch_size, world.world_size, s.drop_last),
                                             s.batch_size, s.drop_last)
        return self.rank_epoch(epoch, world).num_batches

    def compute_epoch(self, epoch: int, world: World) -> RankEpoch:
        """``world``'s rank's part of ``epoch``: a pure function of (spec, sizes, seed, epoch, rank,
        world size, the sampler's plan), whichever thread computes it."""
        s = self.spec
        if s.shard_affinity and isinstance(self.sampler, ShardedPlanSampler):  # only this rank's draws
            m = delivered_draws(s.num_rows, s.batch_size, world.world_size, s.drop_last)
            return affinity.rank_epoch_sharded(s.layout, self.source.shard_offsets, s.batch_size, s.drop_last,
                                               s.seed, epoch, world.rank, world.world_size, self.sampler, m,
                                               s.affinity_group_blocks or None)
        plan = None if self.sampler is None else sampler_plan(self.sampler, epoch, s.num_rows, s.batch_size,
                                                              world.world_size, s.drop_last)
        if s.shard_affinity:
            return affinity.rank_epoch(s.layout, self.source.shard_offsets, s.batch_size, s.drop_last, s.seed,
                                       epoch, world.rank, world.world_size, plan, s.affinity_group_blocks or None)
        return rank_epoch(s.layout, s.num_rows, s.batch_size, s.drop_last, s.seed, epoch, world.rank,
                          world.world_size, plan, local=s.rank_local_order)

    def plan_ahead(self, executor: Executor, epoch: int, world: World) -> bool:
        """Start computing ``world``'s part of ``epoch`` on ``executor`` (the loader's one planning
        thread) so the pass that reads it does not wait; at most one epoch is ahead. Only for plans that
        are pure functions of the epoch: no sampler, a static `ImportanceSampler` or a `ShardedImportance`
        (a loss sampler's plan depends on the priorities when its epoch starts; another sampler may not
        be safe to call from a second thread). False when nothing was started."""
        pure = self.sampler is None or type(self.sampler) in (ImportanceSampler, ShardedImportance)
        if not pure or supports_priorities(self.sampler):
            return False
        key = (epoch, world.rank, world.world_size)
        with self._guard():
            if key in self._cache or key in self._ahead:
                return False
            for old in self._ahead.values():
                old.cancel()
            self._ahead = {key: executor.submit(self.compute_epoch, epoch, world)}
        return True

    def forget_plans(self) -> None:
        """Drop the cached and planned-ahead epochs: a loss sampler's plans depend on its priorities,
        which a loaded state replaces (a pass already running keeps the plan it holds)."""
        with self._guard():
            for fut in self._ahead.values():
                fut.cancel()
            self._ahead = {}
            self._cache = {}

    def drop_ahead(self) -> None:
        """Cancel a plan computed ahead that has not started (a running one finishes on its thread)."""
        with self._guard():
            for fut in self._ahead.values():
                fut.cancel()
            self._ahead = {}

    def _finished(self, pending: "Future[RankEpoch]") -> RankEpoch | None:
        try:
            return pending.result()
        except CancelledError:
            return None

    def _guard(self) -> threading.Lock:
        """This process's lock; a forked child drops the parent's lock and its futures (their thread
        does not exist in the child)."""
        if self._pid != os.getpid():
            self._pid, self._lock, self._ahead = os.getpid(), threading.Lock(), {}
        return self._lock

    def __len__(self) -> int:
        """Rows of one rank's epoch (``epoch``, with the DDP topology read now)."""
        return int(len(self.rank_epoch(self.epoch, self.current_world()).rows))

    def __getitem__(self, index: object) -> NoReturn:
        """Always `ConfigError`: the dataset is iterated by its loader (or alone), never indexed."""
        raise ConfigError(REFUSED)

    def __iter__(self) -> Iterator[Any]:
        """Worker side: this worker's items as plain dicts. Alone: one epoch of batches."""
        if self._worker_side:
            items = self._items()
            pl.close_at_exit(items)  # a spawned worker ends its interpreter: close the pass before that
            return items
        if get_worker_info() is not None:
            raise ConfigError(REFUSED)
        gen = self._alone()
        pl.close_at_exit(gen)
        return gen

    def _alone(self) -> Iterator[Any]:
        world = self.current_world()
        res = pl.Resources(self.source, self.spec, self.delivery, keep_arena=False)
        try:
            for _, batch in pl.run_pass(self.source, self.spec, res, self.rank_epoch(self.epoch, world),
                                        self.epoch, 0, world, StreamStats()):
                yield batch
        finally:
            res.close()

    def _items(self) -> Iterator[dict[str, Any]]:
        epoch, start, rank_world = self.epoch, self.start, self.world
        if self.control is not None:
            e, st, r, w = (int(v) for v in self.control.tolist())
            epoch, start, rank_world = e, st, World(r, w)
        world = detect_worker(rank_world)
        # a persistent worker keeps its readers and warm arena across passes, as the consumer does: a new
        # arena per pass re-read and re-checked the worker's whole share of the lake every epoch
        persistent = self.control is not None
        res = self._worker_res if persistent else None
        ring = self._ring if persistent else None
        if ring is None and self.ring_slots > 0 and POOLING:  # (it tells when views are gone)
            ring = transport.SlotRing(self.ring_slots)
            if persistent:
                self._ring = ring
                multiprocessing.util.Finalize(None, ring.close, exitpriority=10)  # as the resources below
        if ring is not None:
            ring.new_pass()
        if res is None:
            d = self.delivery
            res = pl.worker_resources(self.source, self.spec, world,
                                      d.augment if d is not None and pl.augments_in_workers(d) else None,
                                      packed=ring is not None)
            if persistent:
                self._worker_res = res
                # a forked worker ends with os._exit (no atexit): multiprocessing's finalizers run there too
                multiprocessing.util.Finalize(None, res.close, exitpriority=10)
        stage = pl.build(pl.WORKER, self.source, self.spec, res, self.rank_epoch(epoch, rank_world),
                         epoch, start, world)
        assert stage is not None
        try:
            for work in stage:
                item: dict[str, Any] = {"epoch": work.epoch, "first": work.first, "end": work.end, "rows": work.rows,
                                        "weights": work.weights, "tensors": work.tensors, "stats": work.stats,
                                        "augmented": work.augmented}
                if ring is not None:  # rows and weights too: torch would send each array as a file of its own
                    item["tensors"] = ring.pack({**work.tensors, **_arrays(work.rows, work.weights)})
                    item["rows"] = item["weights"] = None
                work.count("worker_items", 1)
                work.count("worker_fresh_items", float(ring is None or item["tensors"].slot < 0))
                yield item
        finally:
            stage.shutdown()
            if not persistent:
                res.close()  # a warm arena still filling stops before the worker may exit

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}  # recomputed on demand (pure function of the spec)
        state["_ahead"], state["_lock"], state["_pid"] = {}, None, -1  # rebuilt by `_guard` in the copy
        state["_worker_res"], state["_ring"], state["_views"] = None, None, None
        if self._worker_side:  # workers gather host columns, and augment them when `augments_in_workers`
            d = self.delivery
            state["delivery"] = dataclasses.replace(d, collate_fn=None) if pl.augments_in_workers(d) else None
        return state


    def worker_views(self) -> transport.SlotViews:
        """The consumer's views of its workers' rings for one pass: kept across passes for persistent
        workers (their rings persist), new for each pass otherwise."""
        if self.control is None:
            return transport.SlotViews()
        if self._views is None:
            self._views = transport.SlotViews()
        return self._views

    def drop_workers(self) -> None:
        """The persistent workers are gone: forget their rings."""
        self._views = None


_ROWS, _WEIGHTS = "\0rows", "\0weights"   # an item's rows and weights in its packed tensors (no column's name)


def _arrays(rows: np.ndarray, weights: np.ndarray | None) -> dict[str, torch.Tensor]:
    out = {_ROWS: torch.tensor(rows)}
    if weights is not None:
        out[_WEIGHTS] = torch.tensor(weights)
    return out


def work_from_item(item: dict[str, Any], views: transport.SlotViews | None = None) -> Work:
    """Rebuild a `Work` from what a worker yielded (``views``: where packed tensors are mapped)."""
    tensors = item["tensors"]
    rows, weights = item["rows"], item["weights"]
    if isinstance(tensors, transport.Packed):
        if views is None:
            raise StreamError("stream: a packed worker item without the consumer's views")
        tensors = views.unpack(tensors)
        rows, weights = tensors.pop(_ROWS), tensors.pop(_WEIGHTS, None)
    rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    if isinstance(weights, torch.Tensor):
        weights = weights.numpy()
    return Work(int(item["epoch"]), int(item["first"]), int(item["end"]), rows, weights,
                tensors=dict(tensors), stats={k: float(v) for k, v in item["stats"].items()},
                augmented=bool(item.get("augmented", False)))


def _from_worker(exc: M2MError) -> M2MError:
    """torch re-raises a worker's exception with its whole traceback as the message ("Caught X in
    DataLoader worker process 0. Original Traceback ..."): the same type with the original one line and
    where it happened (the traceback stays on ``__cause__``)."""
    msg = str(exc)
    head, _, rest = msg.partition("\n")
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    last = rest.rstrip().rpartition("\n")[2]
    if not head.startswith(f"Caught {type(exc).__name__} ") or not last.startswith(prefix):
        return exc
    where = head[len(f"Caught {type(exc).__name__} "):].rstrip(".")
    try:
        return type(exc)(f"{last[len(prefix):]} ({where})")
    except TypeError:  # an error type whose constructor takes other arguments: keep torch's
        return exc


def from_workers(workers: Iterator[Any], held: Callable[[], bool] | None, num_batches: int,
                 views: transport.SlotViews | None = None) -> Iterator[Work]:
    """A pass's items from the DataLoader's workers. ``held``: whether the pass still holds the loader's
    persistent workers. torch's DataLoader has one persistent-workers iterator and resets it for every
    ``iter``, so a pass started while this one is live takes the workers: this pass then raises at its
    next item instead of reading the newer pass's items (it silently ended short before); a pass that
    already has all its ``num_batches`` batches just ends."""
    done = 0
    while True:
        if held is not None and not held():
            if done >= num_batches:
                return
            raise StreamError("this pass lost its persistent workers to a newer pass of the same loader "
                              "(persistent_workers=True serves one pass at a time): finish or drop a pass "
                              "before starting the next, or use persistent_workers=False")
        try:
            item = next(workers)
        except StopIteration:
            return
        except M2MError as exc:
            raise _from_worker(exc) from exc
        work = work_from_item(item, views)
        done = max(done, work.end)
        yield work
