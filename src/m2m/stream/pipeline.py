"""The one place a stream's stages are assembled, for each role a process can play in one pass.

- ``INLINE`` (the consuming process, ``num_workers=0``): ``BatchStage -> WarmStage|ColdStage ->
  HotStage [-> PrepareAugment] -> Prefetcher`` (or ``BatchStage -> ResidentStage -> Prefetcher`` when the
  lake is resident on the GPU; no Prefetcher with ``prefetch=0``).
- ``WORKER`` (a DataLoader worker): ``BatchStage -> WarmStage|ColdStage -> HotStage("cpu")
  [-> PrepareAugment] [-> AugmentStage]`` (the augmentation of a CPU stream, `augments_in_workers`), or
  ``BatchStage -> RowsStage`` when the consumer gathers on the GPU; each worker's warm arena gets
  ``warm_bytes / num_workers``.
- ``CONSUMER`` (the consuming process, with workers): what it does to a worker's item (gather on the
  device, or copy it there); it augments only items the workers did not.

Whatever the role, `run_pass` then cuts items into batches, applies the augmentation (its generator
is seeded from (seed, epoch, rank, batch index), so a resumed pass draws the same samples), pins,
collates and counts. `Resources` holds what a loader keeps across passes in one process (readers,
warm arena, output pool, resident tier); `close` releases them and may be called any number of times.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from m2m.stream import columns as cols
from m2m.stream import shuffle
from m2m.stream.hooks import Augment, PreparedAugment
from m2m.stream.metrics import StreamStats
from m2m.stream.order import RankEpoch
from m2m.stream.source import CompositeSource, FetchReporting, RowSource
from m2m.stream.spec import ARENA, COLD, StreamSpec, host_tier_for, lookahead_rows, pass_chunk_batches
from m2m.stream.stages.augment import AugmentStage, augmented
from m2m.stream.stages.base import Stage, Work
from m2m.stream.stages.batches import BatchStage, RowsStage
from m2m.stream.stages.cold import ColdReader, ColdStage
from m2m.stream.stages.draw_ahead import PrepareAugment, rerun_item
from m2m.stream.stages.hot import CPU, RESIDENT, STAGED, HostBuffers, HotStage, OutputPool, ResidentStage, ResidentTier
from m2m.stream.stages.hot import finish as finish_work
from m2m.stream.stages.prefetch import Prefetcher, stage_failure
from m2m.stream.stages.warm import WarmArena, WarmStage
from m2m.stream.topology import World

INLINE, WORKER, CONSUMER = "inline", "worker", "consumer"
PROGRESSIVE_LOADS = 16  # blocks one item may load while a fully shuffled lake fills the warm arena

Gather = Callable[[torch.Tensor], torch.Tensor]

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()  # loaders and passes to close before the interpreter ends
_LIVE_LOCK = threading.Lock()
_AT_EXIT: list[bool] = []


def close_at_exit(obj: Any) -> None:
    """Close ``obj`` (a loader or a pass: anything with ``close()``) when the interpreter exits, if it
    is still alive then. Background threads still inside torch while the interpreter tears down abort
    the process ("terminate called without an active exception"); closing first joins them."""
    with _LIVE_LOCK:
        _LIVE.add(obj)
        if not _AT_EXIT:
            atexit.register(_close_live)
            _AT_EXIT.append(True)


def _close_live() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for obj in live:
        try:
            obj.close()
        except Exception:  # noqa: BLE001, S110 - best effort at exit: the next one must still be closed
            pass


@dataclass(frozen=True)
class Delivery:
    """How the consuming process delivers batches (fixed when the loader is made)."""

    device: torch.device
    hot_mode: str
    augment: Augment | None
    return_tensor: bool
    prefetch: int
    intra_op_threads: int | None
    pin_batches: bool
    collate_fn: Any
    num_workers: int


class Resources:
    """What one process keeps across a loader's passes; a pass overlapping a live one `lease`s private ones."""

    def __init__(self, source: RowSource, spec: StreamSpec, delivery: Delivery, keep_arena: bool = True,
                 budget: int | None = None, packed: bool = False) -> None:
        self.source, self.spec, self.delivery = source, spec, delivery
        self.budget = spec.warm_bytes // max(1, delivery.num_workers) if budget is None else budget
        tier = host_tier_for(spec, self.budget)
        self.warm_mode = tier if keep_arena or tier != ARENA else COLD
        self.busy = False
        self.arena: WarmArena | None = None
        self._readers: dict[str, ColdReader] = {}
        self._resident: ResidentTier | None = None
        self._pool: OutputPool | None = None
        self._borrowed = False  # ``arena`` is the leasing owner's (closed by the owner, not here)
        self.packed = packed  # a worker's: items leave through its ring (`worker_resources`)

    def lease(self) -> "Resources":
        """These resources, or private ones (closed by the caller) if a live pass holds them.

        Private ones share what is safe to share: the lake on the GPU, and a warm arena that holds the
        whole lake (its gathers and block loads are safe from any thread, `WarmArena`). A partial arena
        is not shared (its cold fallback reads through one reader's staging buffers), so a pass beside
        a live one over a lake larger than the warm budget reads cold."""
        if not self.busy:
            self.busy = True
            return self
        private = Resources(self.source, self.spec, self.delivery, keep_arena=False)
        private._resident = self._resident  # the lake on the GPU is shared (read-only)
        arena = self.arena
        if arena is not None and arena.whole and not arena.failed and self.warm_mode == ARENA:
            # an abandoned but referenced iterator (``it = iter(dl); next(it)``) keeps its pass live:
            # without this every later pass would gather a full shuffle from disk (20x slower)
            private.arena, private.warm_mode, private._borrowed = arena, ARENA, True
        return private

    def release(self, leased: "Resources") -> None:
        if leased is self:
            self.busy = False
        else:
            leased.close()

    def reader(self, role: str) -> ColdReader:
        """One reader per thread that reads: "stream"/"resident" (all gathered columns), "gather"/"prepare" (``mu``)."""
        if role not in self._readers:
            names = [c.source for c in self.spec.gathered] if role in ("stream", "resident") else ["mu"]
            kept = [n for n in names if n is not None]
            # a source made of others (a mixture of lakes) reads each part with its own ColdReader
            src = self.source
            self._readers[role] = src.open_reader(kept) if isinstance(src, CompositeSource) else ColdReader(src, kept)
        return self._readers[role]

    def resident(self) -> ResidentTier:
        if self._resident is None:
            self._resident = ResidentTier(self.reader("resident"), self.spec.columns, self.delivery.device)
        return self._resident

    def pool(self, size: int) -> OutputPool:
        if self._pool is None:  # kept across passes: its buffers are already faulted in
            self._pool = OutputPool(size)
        return self._pool

    def warm_arena(self) -> WarmArena | None:
        """The pass's warm arena: the one kept from earlier passes, or a new one. A kept arena whose loading
        failed (during its pass or after it, on the fill thread) is replaced: it would re-raise that error
        on every pass, e.g. after a remote read that ran out of retries once."""
        if self.arena is not None and self.arena.failed:
            if self._borrowed:  # the owner replaces it; this pass reads cold from now on
                self.arena, self.warm_mode, self._borrowed = None, COLD, False
                return None
            self.arena.close()
            self.arena = None
        if self.warm_mode == ARENA and self.arena is None:
            self.arena = new_arena(self.reader("stream"), self.spec, self.budget)
        return self.arena

    def close(self) -> None:
        """Stop a warm arena still filling and close the readers' files (idempotent)."""
        if self.arena is not None and not self._borrowed:
            self.arena.close()
        for reader in self._readers.values():
            reader.close()


def owned_resources(owner: Any, source: RowSource, spec: StreamSpec, delivery: Delivery,
                    replacing: weakref.finalize[[], None] | None) -> tuple[Resources, weakref.finalize[[], None]]:
    """``owner``'s `Resources` and the finalizer that closes them when ``owner`` is garbage-collected;
    ``replacing`` (the finalizer of the resources these replace) closes those now and lets them go
    (a finalizer holds its resources until it runs or the owner dies). A loader dropped without
    ``close()`` (a local of a function that returned) would otherwise leave its warm arena's threads
    (fill, load-ahead, huge-page collapse) holding the last reference to the arena's tensors: a daemon
    thread that frees a tensor while the interpreter finalizes aborts the process ("terminate called
    without an active exception": torch releases the GIL while freeing, and a daemon thread taking it
    back during finalization is ended by a forced unwind through torch's C++ frames)."""
    if replacing is not None:
        replacing()
    res = Resources(source, spec, delivery)
    return res, weakref.finalize(owner, res.close)


def augments_in_workers(d: Delivery) -> bool:
    """Whether DataLoader workers augment the batches (`AugmentStage`) instead of the consumer: CPU
    streams with workers whose augmentation declares ``in_workers = True`` (m2m's augmenters do; see
    `m2m.stream.hooks.Augment`). On a GPU the consumer augments on the device."""
    return (d.augment is not None and d.num_workers > 0 and d.device.type == "cpu" and d.hot_mode == CPU
            and getattr(d.augment, "in_workers", False) is True)


def before_workers(d: Delivery, res: Resources, context: Any) -> None:
    """What the consumer does before it starts DataLoader workers with ``context`` (a start method, a
    context or None): build the augmentation's tables (``build_tables``) when workers augment and are
    forked, so they inherit them instead of each building them every pass."""
    build = getattr(d.augment, "build_tables", None)
    if callable(build) and augments_in_workers(d) and _forks(context):
        build(res.source.dim, make_gather(res, "gather"))


def _forks(context: Any) -> bool:
    """Whether DataLoader workers started with ``context`` (None: multiprocessing's default) are forked."""
    if context is None:  # without fixing the process's start method (get_start_method() would)
        return (multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]) == "fork"
    if isinstance(context, str):
        return context == "fork"
    return getattr(context, "get_start_method", lambda: None)() == "fork"


def worker_resources(source: RowSource, spec: StreamSpec, world: World, augment: Augment | None = None,
                     packed: bool = False) -> Resources:
    """A DataLoader worker's readers and arena (``warm_bytes / num_workers``), closed when its pass ends;
    ``augment``: the augmentation the worker applies (`augments_in_workers`), else None; ``packed``:
    its items are copied into its ring of shared buffers (`m2m.stream.transport`) before they leave."""
    host = Delivery(device=torch.device("cpu"), hot_mode="cpu", augment=augment, return_tensor=False, prefetch=0,
                    intra_op_threads=None, pin_batches=False, collate_fn=None, num_workers=world.num_workers)
    return Resources(source, spec, host, packed=packed)


def new_arena(reader: ColdReader, spec: StreamSpec, budget: int) -> WarmArena:
    progressive = PROGRESSIVE_LOADS if spec.layout.mode == shuffle.FULL else None
    fill = progressive is not None and spec.background_fill
    arena = WarmArena(reader, spec.gathered, spec.layout.block_rows, budget, spec.huge_pages, progressive,
                      collapse_after_fill=fill, ahead=spec.background_fill)
    if fill and arena.whole:
        arena.start_fill()
    return arena


def host_stage(spec: StreamSpec, upstream: Stage, reader: ColdReader, buffers: HostBuffers, tier: str,
               arena: WarmArena | None) -> Stage:
    """The host gather stage: the warm arena, or direct cold reads."""
    if tier == ARENA and arena is not None:
        return WarmStage(upstream, arena, spec.columns, buffers)
    return ColdStage(upstream, reader, spec.columns, buffers, spec.layout.block_rows)


def capacity(delivery: Delivery, chunk_batches: int) -> int:
    """Items (of ``chunk_batches`` batches) the prefetcher keeps ready: at least ``prefetch`` batches."""
    return max(1, math.ceil(delivery.prefetch / chunk_batches))


def build(role: str, source: RowSource, spec: StreamSpec, res: Resources | None, plan: RankEpoch | None,
          epoch: int = 0, start: int = 0, world: World | None = None) -> Stage | None:
    """The stage chain of ``role`` for one pass (``plan``/``epoch``/``start``/``world``: the pass's
    rank epoch, first batch and topology; CONSUMER needs only ``res``). A started chain: with a
    Prefetcher, its thread already runs."""
    if role == CONSUMER:
        assert res is not None
        if res.delivery.hot_mode == RESIDENT:
            return ResidentStage(None, res.resident(), spec.columns)
        if res.delivery.device.type == "cuda":
            return HotStage(None, spec.columns, res.delivery.device)
        return None
    assert plan is not None and world is not None
    chunk = pass_chunk_batches(spec, plan.num_batches)
    stage: Stage = BatchStage(plan, epoch, start, world, chunk, lookahead_rows(spec))
    assert res is not None
    if role == WORKER:  # ``res``: the worker's own (`worker_resources`)
        if not spec.gather_in_workers:
            return RowsStage(stage, spec.columns)
        # packed: pooled outputs, copied into the ring; else no pooled outputs (they go to the consumer,
        # which keeps mapping them), made in shared memory
        buffers = HostBuffers(pool=res.pool(4) if res.packed else OutputPool(size=0, shared=True))
        stage = HotStage(host_stage(spec, stage, res.reader("stream"), buffers, res.warm_mode, res.warm_arena()),
                         spec.columns, torch.device("cpu"), buffers)
        aug = res.delivery.augment
        if aug is None:
            return stage
        gather = make_gather(res, "gather")  # after the arena: a whole-lake arena serves neighbour reads
        if isinstance(aug, PreparedAugment):  # the same draws, reruns in one chain per item, as in line
            stage = PrepareAugment(stage, aug, spec.batch_size, spec.seed, world.rank, source.dim, gather)
        return AugmentStage(stage, aug, spec.batch_size, spec.seed, world.rank, gather)
    d = res.delivery
    if d.hot_mode == RESIDENT:
        stage = ResidentStage(stage, res.resident(), spec.columns)
    else:
        buffers = HostBuffers(pinned=d.hot_mode == STAGED, slots=2, pool=res.pool(capacity(d, chunk) + 4))
        stage = HotStage(host_stage(spec, stage, res.reader("stream"), buffers, res.warm_mode, res.warm_arena()),
                         spec.columns, d.device, buffers)
    if d.prefetch == 0:
        return stage
    if draws_ahead(d):
        # draws_ahead(d) holds only for a PreparedAugment with a seed; not expressible as a guard
        prep = PrepareAugment(stage, d.augment, spec.batch_size, spec.seed,  # type: ignore[arg-type]
                              world.rank, source.dim, make_gather(res, "prepare"))
        prefetcher = Prefetcher(prep, capacity(d, chunk), d.intra_op_threads)
        prep.backlog = prefetcher.backlog
        return prefetcher.start()
    return Prefetcher(stage, capacity(d, chunk), d.intra_op_threads).start()


def draws_ahead(d: Delivery) -> bool:
    """Whether the prefetch thread makes the augmentation's draws (CPU streams whose augmentation has
    ``prepare``; on CUDA the augmentation runs asynchronously on the device anyway)."""
    return (d.augment is not None and isinstance(d.augment, PreparedAugment)
            and d.device.type == "cpu" and d.hot_mode != RESIDENT)


def make_gather(res: Resources, role: str) -> Gather:
    """``gather(positions) -> float32 [n, d]`` on the device, through the reader of ``role``."""
    d = res.delivery
    if d.hot_mode == RESIDENT:
        tier = res.resident()
        return lambda rows: tier.gather_mu(rows.to(tier.device))
    reader = res.reader(role).for_scattered_reads(res.arena)  # a whole-lake warm arena serves neighbour reads
    mu_dtype = cols.torch_dtype(res.source.storage_dtype)
    dim, device = res.source.dim, d.device

    def gather(rows: torch.Tensor) -> torch.Tensor:
        idx = rows.detach().to("cpu", torch.int64).numpy()
        out = torch.empty((len(idx), dim), dtype=mu_dtype)
        reader.gather("mu", idx, out)
        return out.to(device=device, dtype=torch.float32)

    return gather


def run_pass(source: RowSource, spec: StreamSpec, shared: Resources, plan: RankEpoch, epoch: int, start: int,
             world: World, stats: StreamStats, worker_items: Iterable[Work] | None = None
             ) -> Iterator[tuple[int, Any]]:
    """One pass: ``(batch index, batch)`` from batch ``start`` of ``epoch`` (from ``worker_items`` when
    DataLoader workers produce the items, else from an INLINE chain)."""
    res = shared.lease()
    chain: Stage | None = None
    try:
        if worker_items is None:
            chain = build(INLINE, source, spec, res, plan, epoch, start, world)
            # build(INLINE, ...) returns a Stage (iterable of Work) whenever the plan is given
            items: Iterable[Work] = chain  # type: ignore[assignment]
            post = None
        else:
            items = worker_items
            post = build(CONSUMER, source, spec, res, None)
        # workers that augment deliver finished items: the consumer needs no reader for neighbours
        skip = worker_items is not None and augments_in_workers(res.delivery)
        gather = None if res.delivery.augment is None or skip else make_gather(res, "gather")
        t0 = time.perf_counter()
        for work in items:
            if post is not None:
                # post is a Stage here; its process() is on the consumer stages only
                work = post.process(work)  # type: ignore[attr-defined]
            finish_work(work)
            if work.prepared is not None and not work.augmented:  # reruns the prefetch thread left to us
                consumer_reruns(res.delivery.augment, work, spec.batch_size, gather)
            for j in range(work.first, work.end):
                yield j, deliver(spec, res.delivery, work, j, epoch, world.rank, gather, stats)
            stats.add(work.stats)
            stats.add({"busy_s": time.perf_counter() - t0})
            t0 = time.perf_counter()
    finally:
        if chain is not None:
            chain.shutdown()
        shared.release(res)


def consumer_reruns(augment: Augment | None, work: Work, batch_size: int, gather: Gather | None) -> None:
    """`rerun_item` in the consumer, its failures raised as the prefetch thread's would be (`Prefetcher`):
    a damaged shard as itself, anything else as `StreamError` with the cause chained, whichever thread
    happened to make the reruns."""
    try:
        rerun_item(augment, work, batch_size, gather)
    except Exception as exc:  # noqa: BLE001 - re-raised as the typed error the prefetch thread gives
        raise stage_failure(exc, "stream: the exact reruns of an item") from exc


def deliver(spec: StreamSpec, d: Delivery, work: Work, j: int, epoch: int, rank: int, gather: Gather | None,
            stats: StreamStats) -> Any:
    """Batch ``j`` of ``work`` as the user receives it: augmented, pinned, collated."""
    rows = work.batch_slice(j, spec.batch_size)
    batch = {name: t[rows] for name, t in work.tensors.items()}
    if d.augment is not None and not work.augmented:
        ahead = work.prepared.get(j) if work.prepared is not None else None
        batch[cols.EMBEDDING] = augmented(d.augment, batch, spec.seed, epoch, rank, j, gather, ahead)
    stats.add({"rows": rows.stop - rows.start, "batches": 1})
    out: Any = batch[cols.EMBEDDING] if d.return_tensor else {c.name: batch[c.name] for c in spec.columns}
    if d.pin_batches:
        out = out.pin_memory() if isinstance(out, torch.Tensor) else {k: v.pin_memory() for k, v in out.items()}
    if d.collate_fn is not None:
        out = d.collate_fn(out)
    return out


def report(stats: StreamStats, hot_mode: str, res: "Resources", spec: StreamSpec, source: RowSource) -> dict[str, Any]:
    """`StreamLoader.stats`: the pass counters, a remote lake's node-cache downloads in this process
    (``fetch``), and the warm arena's background fill counted in ``bytes_cold``."""
    out = stats.report(hot_mode, res.warm_mode, spec.layout.mode)
    fetched = source.fetch_stats() if isinstance(source, FetchReporting) else None
    if fetched is not None:
        out["fetch"] = fetched
    if res.arena is not None:
        cold = out.get("bytes_cold", 0)
        out["bytes_cold"] = (cold if isinstance(cold, (int, float)) else 0) + res.arena.fill_bytes
        out["warm_filling"] = res.arena.filling
    return out
