"""`StreamLoader`, the DataLoader a lake exports, and `make_loader` (a `RowSource` -> a loader).

Fast path (``num_workers=0``): the stage chain runs in one background thread of the consumer, which
only splits items into batches, augments and counts; with workers, they run the host stages and their
items cross in shared buffers (`m2m.stream.transport`). The batch sequence is identical either way
(`m2m.stream.partition`); stages: `m2m.stream.pipeline`; resume: `m2m.stream.state`; ``dl.sampler``:
`m2m.stream.epoch_sampler`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generator, Iterator

import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _DatasetKind

from m2m._validate import check_int
from m2m.config import DEFAULT_HOT_BYTES, DEFAULT_WARM_BYTES
from m2m.errors import ConfigError
from m2m.sampling.plan import PlanSampler, supports_priorities
from m2m.stream import pipeline as pl
from m2m.stream import state as st
from m2m.stream.dataset import STARTING_WORKERS, StreamDataset, from_workers
from m2m.stream.epoch_sampler import EpochSampler
from m2m.stream.hooks import Augment
from m2m.stream.metrics import StreamStats
from m2m.stream.options import StreamOptions
from m2m.stream.source import ComputedGeometry, PinnedSnapshot, RowSource
from m2m.stream.spec import StreamSpec, device_of, lake_pass_chunk_batches, plan_stream
from m2m.stream.topology import World

__all__ = ["SOURCE_DEFAULTS", "EpochSampler", "StreamLoader", "make_loader"]

#: Budgets of a source streamed without a lake config (`make_loader`).
SOURCE_DEFAULTS = {"device": "cpu", "seed": 0, "warm_bytes": DEFAULT_WARM_BYTES, "hot_bytes": DEFAULT_HOT_BYTES, "prefetch": 4}


def make_loader(source: RowSource, options: StreamOptions | None = None, *, sampler: PlanSampler | None = None,
                augment: Augment | None = None, lake: str | None = None, version: int | str | None = None,
                **overrides: Any) -> "StreamLoader":
    """A `StreamLoader` over ``source``: ``options`` with keyword ``overrides`` (`StreamOptions` fields).

    ``sampler``: an importance plan (`m2m.sampling.plan.PlanSampler`); ``augment``: the augmentation
    hook (`m2m.stream.hooks.Augment`); ``lake``/``version``: the identity of the rows, kept in states.
    """
    if not isinstance(source, RowSource):
        raise ConfigError(f"source must implement RowSource, got {type(source).__name__}")
    opts = StreamOptions.merged(options, overrides).with_defaults(SOURCE_DEFAULTS)
    if sampler is not None and not callable(getattr(sampler, "plan", None)):
        raise ConfigError(f"sampler must be an m2m plan sampler (a plan(epoch) method), got {type(sampler).__name__}: "
                          "the stream orders and shards rows itself (use shuffle, seed, rank/world_size)")
    dev = device_of(opts)
    spec, hot = plan_stream(source, opts, dev, lake, version)
    if augment is not None and not any(c.name == "embedding" for c in spec.columns):
        raise ConfigError(f"augment replaces 'embedding', which columns={opts.columns!r} does not deliver")
    pin = opts.pin_memory and dev.type == "cpu" and opts.num_workers == 0  # with workers torch's pin thread does it
    if opts.pin_memory and dev.type == "cpu" and not torch.cuda.is_available():
        warnings.warn("pin_memory=True but CUDA is not available: batches stay in pageable memory "
                      "(as torch's DataLoader does)", stacklevel=2)
        pin = False
    delivery = pl.Delivery(device=dev, hot_mode=hot, augment=augment, return_tensor=opts.columns is None,
                           prefetch=int(opts.prefetch or 0), intra_op_threads=opts.intra_op_threads,
                           pin_batches=pin, collate_fn=opts.collate_fn, num_workers=opts.num_workers)
    return StreamLoader(StreamDataset(source, spec, delivery, sampler), opts)


class StreamLoader(DataLoader[Any]):
    """A `torch.utils.data.DataLoader` whose dataset yields whole batches; ``dl.batch_size`` is their size.

    Epoch contract (the same with 0 or N workers, 1 or N ranks): each ``iter(dl)`` is one whole
    epoch from its first batch; which epoch is `m2m.stream.state.Cursor`'s rule (a loaded state once,
    else the epoch pinned by `set_epoch`, else the one after the last pass's). A pass abandoned early
    leaves nothing behind. Passes may overlap (``zip(dl, dl)``): a later one reads through its own buffers.
    """

    batch_size: int   # (DataLoader's is Optional: here always the batch size)

    dataset: StreamDataset  # (DataLoader declares Dataset[Any]: typed here so that len(dl.dataset) checks)
    legacy_lakes: tuple[str, ...] = ()  # other names the rows had in older states (`Mixture.legacy_identities`)

    def __init__(self, dataset: StreamDataset, options: StreamOptions) -> None:
        o = options
        extra: dict[str, Any] = {}
        if o.num_workers > 0:
            chunk = lake_pass_chunk_batches(dataset.spec)  # items per worker: at least `prefetch` batches ready
            factor = o.prefetch_factor or max(2, math.ceil((o.prefetch or 0) / (chunk * o.num_workers)))
            extra = {"prefetch_factor": factor, "pin_memory": o.pin_memory or dataset.delivery.device.type == "cuda",
                     "persistent_workers": o.persistent_workers, "timeout": o.timeout,
                     "worker_init_fn": o.worker_init_fn, "multiprocessing_context": o.multiprocessing_context}
            dataset.ring_slots = 0 if extra["pin_memory"] else factor + 3  # torch would pin (copy) the rings
            if o.persistent_workers:  # workers keep their dataset copy: each pass's numbers go through this
                dataset.control = torch.zeros(4, dtype=torch.int64).share_memory_()
        super().__init__(dataset, batch_size=None, shuffle=None, num_workers=o.num_workers, **extra)
        # DataLoader forbids setting these after __init__; the dataset is iterable-style (see StreamDataset)
        object.__setattr__(self, "_dataset_kind", _DatasetKind.Iterable)
        object.__setattr__(self, "sampler", EpochSampler(self))
        object.__setattr__(self, "batch_size", dataset.spec.batch_size)
        object.__setattr__(self, "drop_last", dataset.spec.drop_last)
        self.options = o
        self._ds = dataset  # dl.dataset, typed
        self.spec = dataset.spec
        self.device, self.hot_mode = dataset.delivery.device, dataset.delivery.hot_mode
        self.augment = dataset.delivery.augment
        self.plan_sampler = dataset.sampler
        self._cursor = st.Cursor(o.epoch)
        self._stats = StreamStats()
        self._res, self._res_fin = pl.owned_resources(self, dataset.source, dataset.spec, dataset.delivery, None)
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self._plans: ThreadPoolExecutor | None = None  # one thread computing the next epoch's plan
        pl.close_at_exit(self)

    # ----------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        """Numbers and configuration only: readers, arenas, threads and live passes are rebuilt lazily."""
        state = self.__dict__.copy()
        for name in ("_iterator", "_live", "_res", "_res_fin", "_plans", "_workers_owner"):
            state[name] = None
        state["_stats"] = StreamStats()
        state["sampler"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cursor = copy.copy(self._cursor)  # its own (no live passes: those stay with the original)
        ds = self._ds
        if ds.control is not None:
            # a copy (pickle, deepcopy, copy.copy, mp.spawn) tells its own persistent workers its own passes:
            # the original's shared numbers would be another loader's (another rank's, under ddp_spawn)
            ds = self._ds = copy.copy(ds)  # (copy.copy shares the original's dataset object)
            object.__setattr__(self, "dataset", ds)
            ds.control = torch.zeros(4, dtype=torch.int64).share_memory_()
        self._live = weakref.WeakSet()
        self._res, self._res_fin = pl.owned_resources(self, ds.source, ds.spec, ds.delivery, None)
        object.__setattr__(self, "sampler", EpochSampler(self))
        pl.close_at_exit(self)

    # ----------------------------------------------------------------- public surface
    def __len__(self) -> int:
        """Batches of the next pass on this rank (the DDP topology read now)."""
        return self._ds.num_batches(self.epoch, self._ds.current_world())

    # yields the stream's batches, not torch's _BaseDataLoaderIter
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        gen = st.Pass(self._iterate())
        self._live.add(gen)
        return gen

    def set_epoch(self, epoch: int) -> None:
        """Pin the epoch of every following pass to ``epoch`` (``DistributedSampler`` semantics).

        A pass created but not yet started (Lightning calls ``iter`` before ``set_epoch``) takes it too;
        a pass already yielding is not disturbed. A resume loaded for another epoch is dropped.
        """
        self._cursor.set_epoch(check_int(epoch, "epoch", 0))

    @property
    def epoch(self) -> int:
        """The epoch the next pass will read."""
        return self._cursor.epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is (`m2m.stream.state.StreamState`): any rank's state resumes every rank."""
        world = self._ds.current_world()
        others = self._cursor.elsewhere(lambda e: int(self._ds.num_batches(e, world)))
        if others:  # e.g. one loader for training and validation, saved right after a validation pass
            epoch, done = others[0]
            warnings.warn(f"state_dict(): this loader has another live pass, at batch {done} of epoch {epoch}; "
                          "the state saved is that of the pass that yielded last (use separate loaders for "
                          "training and validation)", stacklevel=2)
        return self._state().to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next pass yields exactly this rank's batches not yet yielded when ``state`` was
        taken (on any rank); the passes after it continue as the saved loader would have."""
        saved = st.StreamState.from_dict(state)
        if saved.lake is not None and saved.lake in self.legacy_lakes:
            saved = dataclasses.replace(saved, lake=self.spec.lake, version=saved.version or self.spec.version)
        if saved.shard_affinity and self.spec.shard_affinity \
                and saved.affinity_group_blocks != self.spec.affinity_group_blocks:
            self._adopt(dataclasses.replace(self.spec, affinity_group_blocks=saved.affinity_group_blocks))
        world = self._ds.current_world()
        epoch, start = st.check(saved, self._state(), lambda e: self._ds.num_batches(e, world))
        if saved.sampler is not None and isinstance(self.plan_sampler, st.StatefulSampler):
            self.plan_sampler.load_state_dict(saved.sampler)
            self._ds.forget_plans()   # plans drawn from the priorities before (a stale one served wrong rows)
        self._cursor.restore(epoch, start, st.pinned_after(saved, epoch))

    def update_priorities(self, ids: Any, losses: Any, source: Any = None) -> None:
        """Feed per-row losses back to a loss-based importance sampler (``importance_sampling="loss"``),
        e.g. ``dl.update_priorities(batch["id"], per_row_loss.detach())`` after each step, with
        ``columns=("embedding", "id")``; on a mixture (`m2m.mix`) also ``source=batch["source"]``."""
        if not supports_priorities(self.plan_sampler):
            kind = "no sampler" if self.plan_sampler is None else type(self.plan_sampler).__name__
            raise ConfigError(f"update_priorities needs a loss-based importance sampler; this loader has {kind}")
        extra = {} if source is None else {"source": source}  # (a user's sampler may not take source)
        self.plan_sampler.update_priorities(ids, losses, **extra)  # type: ignore[union-attr]

    def stats(self) -> dict[str, Any]:
        """Rows/s, bytes per tier, prefetch stall seconds, warm hit rate, tier modes (cumulative).
        ``bytes_cold`` includes the warm arena's background fill (``warm_filling``: still running)."""
        return pl.report(self._stats, self.hot_mode, self._res, self.spec, self._ds.source)

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Block until the warm arena's fill (and its huge-page collapse) is done; False on ``timeout``."""
        return True if self._res.arena is None else self._res.arena.wait_filled(timeout)

    def close(self) -> None:
        """Stop every live pass, the workers and the warm arena's fill; release readers. Idempotent;
        the loader stays usable (a later pass reopens what it needs)."""
        for gen in list(self._live or ()):
            gen.close()
        self._drop_workers()
        if self._res is not None:
            self._res.close()
        self._ds.drop_ahead()
        plans, self._plans = self.__dict__.get("_plans"), None
        if plans is not None:
            plans.shutdown(wait=False, cancel_futures=True)

    def _drop_workers(self, dead_only: bool = False) -> None:
        """Shut the persistent workers down: always, or when one has died (a Ctrl-C to the process group
        ends them too; the next pass waited 5 s for them and raised torch's "exited unexpectedly")."""
        kept = self.__dict__.get("_iterator")
        if kept is not None and not (dead_only and all(w.is_alive() for w in kept._workers)):
            kept._shutdown_workers()
            self._iterator = None
            self._ds.drop_workers()

    def _adopt(self, spec: StreamSpec) -> None:
        """Stream by ``spec`` from now on: a saved state's shard-affinity group size (the group follows the
        node cache's budget, which may differ a little between processes; every rank loads the same state)."""
        self.close()
        self.spec = self._ds.spec = spec
        self._ds._cache.clear()
        self._res, self._res_fin = pl.owned_resources(self, self._ds.source, spec, self._ds.delivery, self._res_fin)

    # ----------------------------------------------------------------- iteration
    def _state(self) -> st.StreamState:
        spec, world = self.spec, self._ds.current_world()
        def num_batches(e: int) -> int:
            return int(self._ds.num_batches(e, world))
        epoch, yielded = self._cursor.position(num_batches)
        sampler = self.plan_sampler.state_dict() if isinstance(self.plan_sampler, st.StatefulSampler) else None
        return st.StreamState(
            epoch=epoch, batches_yielded=yielded, epoch_pinned=self._cursor.pinned is not None, seed=spec.seed,
            world_size=world.world_size, batch_size=spec.batch_size, drop_last=spec.drop_last,
            num_rows=spec.num_rows, shuffle=spec.layout.mode, block_rows=spec.layout.block_rows,
            window_blocks=spec.layout.window_blocks, shard_affinity=spec.shard_affinity,
            affinity_group_blocks=spec.affinity_group_blocks, epoch_batches=num_batches(epoch),
            lake=spec.lake, version=spec.version, rank=world.rank, sampler=sampler,
            importance=st.importance_name(self.options.importance_sampling),
            shuffle_asked=self.options.shuffle_mode if self.options.shuffle else "none",
            geometry=(src.geometry_key if isinstance(src := self._ds.source, ComputedGeometry) else None) or "none",
            snapshot=src.snapshot_key if isinstance(src, PinnedSnapshot) else None, pinned_epoch=self._cursor.pinned)

    def _iterate(self) -> Generator[Any, None, None]:
        ds = self._ds
        epoch, start, token = self._cursor.begin_pass()
        workers = None
        try:
            world = ds.current_world()
            plan = ds.rank_epoch(epoch, world)  # computed here once (workers inherit it)
            if self._plans is None:  # the loader's one planning thread (`StreamDataset.plan_ahead`)
                self._plans = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m2m-plan")
            ds.plan_ahead(self._plans, epoch + 1, world)  # the next pass's plan, while this one streams
            workers = self._start_workers(epoch, start, world) if self.num_workers else None
            owner = self._workers_owner = object()  # the newest pass holds persistent workers
            held = (lambda: self._workers_owner is owner) if self.persistent_workers else None
            items = None if workers is None else from_workers(workers, held, plan.num_batches, ds.worker_views())
            for j, batch in pl.run_pass(ds.source, self.spec, self._res, plan, epoch, start, world, self._stats,
                                        items):
                self._cursor.advance(token, epoch, j + 1)
                yield batch
        finally:
            self._cursor.end_pass(token)
            if workers is not None and not self.persistent_workers:
                workers._shutdown_workers()

    def _start_workers(self, epoch: int, start: int, world: World) -> Any:
        """The DataLoader's worker iterator for one pass (workers see this pass's numbers)."""
        ds = self._ds
        self._drop_workers(dead_only=True)
        with STARTING_WORKERS:  # (two threads' passes forked workers with each other's numbers: rows doubled)
            ds.epoch, ds.start, ds.world = epoch, start, world
            if ds.control is not None:
                ds.control.copy_(torch.tensor([epoch, start, world.rank, world.world_size], dtype=torch.int64))
            pl.before_workers(ds.delivery, self._res, self.options.multiprocessing_context)
            ds._worker_side = True  # only the copies workers receive now (fork or pickle) iterate
            try:
                return super().__iter__()
            finally:
                ds._worker_side = False
