"""`make_loader` and `StreamLoader`: the DataLoader a lake exports.

Fast path (the default, ``num_workers=0``): the whole stage chain runs in one background thread
of the consuming process and hands over items of several batches; the consumer only splits them
into batches (views), applies the augmentation hook and counts. With ``num_workers > 0`` the
DataLoader's worker processes run the host stages and the consumer does the device part; the
batch sequence is identical either way (see `m2m.stream.partition`).

Resume state is ``(epoch, batches yielded)`` plus the numbers that fix the order; a restored
loader starts its next iteration at the first batch not yet yielded, with the same augmentation
draws (their generator is seeded from (seed, epoch, rank, batch index), independent of workers).
"""

from __future__ import annotations

import math
import os
import time
import warnings
import weakref
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _InfiniteConstantSampler

from m2m._validate import check_int
from m2m.errors import (
    ConfigError,
    DeviceUnavailableError,
    StateMismatchError,
    StreamError,
)
from m2m.sampling.plan import PlanSampler, supports_priorities
from m2m.stream import columns as cols
from m2m.stream import shuffle as shuffle_mod
from m2m.stream.dataset import (
    ARENA,
    COLD,
    WARM_MODES,
    StreamDataset,
    StreamSpec,
    chunk_batches_for,
    host_tier_for,
    work_from_item,
)
from m2m.stream.hooks import Augment, PreparedAugment, batch_generator
from m2m.stream.metrics import StreamStats
from m2m.stream.order import choose_layout
from m2m.stream.source import RowSource
from m2m.stream.stages.base import Stage, Work
from m2m.stream.stages.cold import ColdReader
from m2m.stream.stages.draw_ahead import PrepareAugment
from m2m.stream.stages.hot import (
    CPU,
    RESIDENT,
    STAGED,
    HostBuffers,
    HotStage,
    OutputPool,
    ResidentStage,
    ResidentTier,
    finish,
    resident_bytes,
)
from m2m.stream.stages.prefetch import Prefetcher
from m2m.stream.stages.warm import WarmArena
from m2m.stream.topology import World, detect_rank

STATE_VERSION = 1
HOT_MODES = ("auto", RESIDENT, STAGED)
def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def make_loader(source: RowSource, *, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                columns: Sequence[str] | None = None, device: str | torch.device = "cpu", seed: int | None = None,
                epoch: int = 0, rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                warm_bytes: int, hot_bytes: int, prefetch: int = 4, sampler: PlanSampler | None = None,
                augment: Augment | None = None, shuffle_mode: str = "auto", block_rows: int | None = None,
                warm_mode: str = "auto", hot_mode: str = "auto", chunk_batches: int | None = None,
                intra_op_threads: int | None = 1, huge_pages: bool = True,
                background_fill: bool = True, pin_memory: bool = False, persistent_workers: bool = False,
                prefetch_factor: int | None = None, timeout: float = 0, worker_init_fn: Any = None,
                multiprocessing_context: Any = None, generator: torch.Generator | None = None,
                collate_fn: Any = None, in_order: bool = True,
                shard_affinity: bool | None = None) -> "StreamLoader":
    """A DataLoader over ``source`` that yields whole batches (see the module docstring).

    ``prefetch`` is the number of batches a background thread keeps ready; 0 runs the stages in the
    consuming thread (no overlap with training, but no thread handoffs: on an oversubscribed CPU
    this can be faster). Beyond the facade's arguments: ``shuffle_mode`` ("auto" | "full" | "block"; auto = full when
    the lake fits ``warm_bytes``), ``block_rows`` (block size; default ~4 MiB of rows),
    ``warm_mode`` ("auto" | "arena" | "cold"), ``hot_mode`` ("auto" | "resident" | "staged"),
    ``chunk_batches`` (batches per internal item; default ~4 MiB), ``intra_op_threads`` (torch
    threads of the stream thread; None leaves torch alone) and ``huge_pages`` (back the warm arena
    with transparent huge pages, as numpy does for large arrays: steady epochs 1.15-1.35x faster
    here; the kernel may compact memory while the arena first fills, so the first epoch's speed
    varies with the host's memory state: 0.2x to 3x that of 4 KiB pages in our runs) and
    ``background_fill`` (when a fully shuffled lake fits the arena, fill it on a background thread and
    serve the first epoch from the mapped shards meanwhile; False loads blocks on demand instead) and
    ``shard_affinity`` (block-shuffle mode: each rank streams a disjoint set of whole shards per epoch,
    see `m2m.stream.affinity`; None = on for block-shuffled remote lakes, True elsewhere needs block mode).

    The standard DataLoader keywords keep their torch meaning: ``pin_memory`` (CPU batches in pinned
    memory when CUDA is available), ``persistent_workers``, ``prefetch_factor`` (internal items per
    worker; default from ``prefetch``), ``timeout``, ``worker_init_fn`` and ``multiprocessing_context``
    (the DataLoader workers, ``num_workers > 0``), ``generator`` (its ``initial_seed()`` is the seed),
    ``collate_fn`` (applied to each whole batch, after the augmentation) and ``in_order`` (must stay True).
    """
    if not isinstance(source, RowSource):
        raise ConfigError(f"source must implement RowSource, got {type(source).__name__}")
    batch_size = check_int(batch_size, "batch_size", 1)
    seed = seed_from(seed, generator)
    epoch = check_int(epoch, "epoch", 0)
    num_workers = check_int(num_workers, "num_workers", 0)
    warm_bytes = check_int(warm_bytes, "warm_bytes", 0)
    hot_bytes = check_int(hot_bytes, "hot_bytes", 0)
    prefetch = check_int(prefetch, "prefetch", 0)
    if chunk_batches is not None:
        chunk_batches = check_int(chunk_batches, "chunk_batches", 1)
    if intra_op_threads is not None:
        intra_op_threads = check_int(intra_op_threads, "intra_op_threads", 1)
    if warm_mode not in WARM_MODES:
        raise ConfigError(f"warm_mode must be one of {WARM_MODES}, got {warm_mode!r}")
    if hot_mode not in HOT_MODES:
        raise ConfigError(f"hot_mode must be one of {HOT_MODES}, got {hot_mode!r}")
    if sampler is not None and not callable(getattr(sampler, "plan", None)):
        raise ConfigError(f"sampler must be an m2m plan sampler (a plan(epoch) method), got {type(sampler).__name__}: "
                          "the stream orders and shards rows itself (use shuffle, seed, rank/world_size)")
    workers = worker_options(num_workers, pin_memory, persistent_workers, prefetch_factor, timeout,
                             worker_init_fn, multiprocessing_context, collate_fn, in_order)
    dev = _device(device)
    if rank is not None or world_size is not None:  # explicit values are checked now, the rest at iteration
        detect_rank(rank, world_size)
    resolved = cols.resolve(source, columns)
    if augment is not None and not any(c.name == cols.EMBEDDING for c in resolved):
        raise ConfigError(f"augment replaces 'embedding', which columns={columns!r} does not deliver")
    row_bytes = cols.nominal_row_bytes(source)
    layout = choose_layout(source.num_rows, row_bytes, warm_bytes, bool(shuffle), shuffle_mode, block_rows)
    if shard_affinity is None:
        shard_affinity = layout.mode == shuffle_mod.BLOCK and bool(getattr(source, "is_remote", False))
    elif shard_affinity and layout.mode != shuffle_mod.BLOCK:
        raise ConfigError(f"shard_affinity=True needs the block shuffle; this stream's shuffle is {layout.mode!r} "
                          "(pass shuffle_mode='block')")
    group_blocks = 0  # shard affinity on a remote lake: shuffle in groups of half the node cache, which the
    cache_limit = getattr(source, "open_bytes_limit", None) if shard_affinity else None  # node's ranks share
    if cache_limit:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # set by torchrun
        group_blocks = max(layout.window_blocks,
                           (cache_limit // (2 * local_ranks)) // max(1, layout.block_rows * row_bytes))
    if hot_mode == "auto":
        hot = CPU if dev.type != "cuda" else (
            RESIDENT if resident_bytes(resolved, source.num_rows) <= hot_bytes else STAGED)
    elif hot_mode == STAGED and dev.type != "cuda":
        raise ConfigError(f"hot_mode='staged' needs a CUDA device, got {dev}")
    else:
        hot = hot_mode
    spec = StreamSpec(
        columns=resolved, layout=layout, num_rows=int(source.num_rows), batch_size=batch_size,
        drop_last=bool(drop_last), seed=seed, rank=rank, world_size=world_size,
        chunk_batches=chunk_batches or chunk_batches_for(resolved, batch_size), warm_bytes=warm_bytes,
        warm_mode=warm_mode, gather_in_workers=hot != RESIDENT, huge_pages=bool(huge_pages),
        background_fill=bool(background_fill), shard_affinity=bool(shard_affinity),
        affinity_group_blocks=int(group_blocks))
    dataset = StreamDataset(source, spec, sampler)
    return StreamLoader(dataset, device=dev, num_workers=num_workers, prefetch=prefetch, augment=augment,
                        hot_mode=hot, return_tensor=columns is None, epoch=epoch,
                        intra_op_threads=intra_op_threads, **workers)


def pin_memory_tree(batch: Any) -> Any:
    """``batch`` (a tensor or a dict of tensors) in pinned host memory."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    return {k: v.pin_memory() for k, v in batch.items()}


def seed_from(seed: int | None, generator: Any) -> int:
    """The stream's seed: ``seed``, else a torch ``generator``'s ``initial_seed()``, else 0."""
    if generator is None:
        return 0 if seed is None else check_int(seed, "seed", 0)
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    from_gen = int(generator.initial_seed())
    if seed is not None and check_int(seed, "seed", 0) != from_gen:
        raise ConfigError(f"seed={seed} and generator (initial_seed {from_gen}) disagree: pass one of them")
    return from_gen


def worker_options(num_workers: int, pin_memory: bool, persistent_workers: bool, prefetch_factor: int | None,
                   timeout: float, worker_init_fn: Any, multiprocessing_context: Any, collate_fn: Any,
                   in_order: bool) -> dict[str, Any]:
    """Check the standard DataLoader keywords the way torch does (as `ConfigError`); what StreamLoader takes."""
    if persistent_workers and num_workers == 0:
        raise ConfigError("persistent_workers=True needs num_workers > 0 (as in torch's DataLoader)")
    if prefetch_factor is not None:
        if num_workers == 0:
            raise ConfigError(f"prefetch_factor={prefetch_factor!r} needs num_workers > 0; "
                              "with num_workers=0 use prefetch= (batches a background thread keeps ready)")
        prefetch_factor = check_int(prefetch_factor, "prefetch_factor", 1)
    if multiprocessing_context is not None and num_workers == 0:
        raise ConfigError(f"multiprocessing_context={multiprocessing_context!r} needs num_workers > 0 "
                          "(as in torch's DataLoader)")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ConfigError(f"timeout must be a number >= 0, got {timeout!r}")
    for name, fn in (("worker_init_fn", worker_init_fn), ("collate_fn", collate_fn)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{name} must be callable, got {type(fn).__name__}")
    if in_order is not True:
        raise ConfigError(f"in_order={in_order!r} cannot apply: the stream's batch order is a deterministic "
                          "function of (seed, epoch, rank), whatever the number of workers")
    return {"pin_memory": bool(pin_memory), "persistent_workers": bool(persistent_workers),
            "prefetch_factor": prefetch_factor, "timeout": float(timeout), "worker_init_fn": worker_init_fn,
            "multiprocessing_context": multiprocessing_context, "collate_fn": collate_fn}


class EpochSampler(_InfiniteConstantSampler):
    """``dl.sampler`` of a `StreamLoader`: ``set_epoch`` reaches the loader.

    Lightning (``_set_sampler_epoch``) and DDP code call ``dataloader.sampler.set_epoch(epoch)``; for an
    IterableDataset torch's sampler is a placeholder without ``set_epoch``, so those calls were lost.
    """

    def __init__(self, loader: "StreamLoader") -> None:
        super().__init__()
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


class StreamLoader(DataLoader):
    """A `torch.utils.data.DataLoader` whose dataset yields whole batches (``batch_size=None``).

    Epoch contract (the same with 0 or N workers, 1 or N ranks): each ``iter(dl)`` is one whole
    epoch from its first batch. The epoch of a pass is chosen when it yields its first batch:
    the state given to `load_state_dict` (once: that pass resumes mid-epoch), else the epoch pinned
    by `set_epoch` (every pass, as with ``DistributedSampler``), else the epoch after that of the
    last pass that started (so a loop that never calls ``set_epoch`` gets a new order each epoch).
    A pass abandoned early leaves nothing behind: the next pass is whole. Passes may overlap
    (``zip(dl, dl)``): a pass started while another is live reads through its own buffers.
    """

    def __init__(self, dataset: StreamDataset, *, device: torch.device, num_workers: int, prefetch: int,
                 augment: Augment | None, hot_mode: str, return_tensor: bool, epoch: int = 0,
                 intra_op_threads: int | None = 1, pin_memory: bool = False, persistent_workers: bool = False,
                 prefetch_factor: int | None = None, timeout: float = 0, worker_init_fn: Any = None,
                 multiprocessing_context: Any = None, collate_fn: Any = None) -> None:
        spec = dataset.spec
        extra: dict[str, Any] = {}
        if num_workers > 0:
            if prefetch_factor is None:
                prefetch_factor = max(1, math.ceil(prefetch / (spec.chunk_batches * num_workers)))
            extra = {"prefetch_factor": prefetch_factor, "pin_memory": pin_memory or device.type == "cuda",
                     "persistent_workers": persistent_workers, "timeout": timeout,
                     "worker_init_fn": worker_init_fn, "multiprocessing_context": multiprocessing_context}
            if persistent_workers:  # the workers keep their dataset copy: each pass's numbers go through here
                dataset.control = torch.zeros(4, dtype=torch.int64).share_memory_()
        super().__init__(dataset, batch_size=None, shuffle=None, num_workers=num_workers, **extra)
        object.__setattr__(self, "sampler", EpochSampler(self))  # DataLoader forbids setting it after __init__
        self.spec = spec
        self.device = device
        self.prefetch = prefetch
        self.augment = augment
        self.hot_mode = hot_mode
        self.return_tensor = return_tensor
        self.intra_op_threads = intra_op_threads
        self.user_collate = collate_fn
        # consumer-side pinning (in-process pipeline); with workers torch's pin thread does it
        self.pin_batches = bool(pin_memory) and device.type == "cpu" and num_workers == 0
        if pin_memory and device.type == "cpu" and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but CUDA is not available: batches stay in pageable memory "
                          "(as torch's DataLoader does)", stacklevel=3)
            self.pin_batches = False
        self.plan_sampler = dataset.sampler
        self._next_epoch = epoch
        self._pinned: int | None = None
        self._resume: tuple[int, int] | None = None
        self._pos: list[int] | None = None  # [epoch, batches yielded] of the latest pass that started
        self._passes = 0
        self._busy = False  # the shared readers/arena/pool are leased by a live pass
        self._stats = StreamStats()
        self._reader: ColdReader | None = None
        self._gather_reader: ColdReader | None = None
        self._prepare_reader: ColdReader | None = None
        self._arena: WarmArena | None = None
        self._resident: ResidentTier | None = None
        self._pool: OutputPool | None = None
        self._warm_mode = host_tier_for(spec, spec.warm_bytes // max(1, num_workers))
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()

    # ----------------------------------------------------------------- pickling
    _RUNTIME = ("_reader", "_gather_reader", "_prepare_reader", "_arena", "_resident", "_pool", "_iterator")

    def __getstate__(self) -> dict[str, Any]:
        """Numbers and configuration only: readers, arenas, threads and live passes are rebuilt lazily."""
        state = self.__dict__.copy()
        for name in self._RUNTIME:
            state[name] = None
        state["_live"] = None
        state["_busy"] = False
        state["_stats"] = StreamStats()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._live = weakref.WeakSet()

    # ----------------------------------------------------------------- public surface
    def __len__(self) -> int:
        """Batches of the next pass on this rank (the DDP topology read now)."""
        return self.dataset.rank_epoch(self.epoch, self.dataset.current_world()).num_batches

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        gen = self._iterate()
        self._live.add(gen)
        return gen

    def set_epoch(self, epoch: int) -> None:
        """Pin the epoch of every following pass to ``epoch`` (``DistributedSampler`` semantics).

        A pass created but not yet started (Lightning calls ``iter`` before ``set_epoch``) takes it too;
        a pass already yielding is not disturbed. A resume loaded for another epoch is dropped.
        """
        epoch = check_int(epoch, "epoch", 0)
        self._pinned = epoch
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None

    @property
    def epoch(self) -> int:
        """The epoch the next pass will read."""
        if self._resume is not None:
            return self._resume[0]
        return self._next_epoch if self._pinned is None else self._pinned

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: epoch and batches yielded of the latest pass, and the numbers that fix the order.

        A pass that yielded all its batches is saved as the start of the epoch that follows it.
        """
        spec = self.spec
        world = self.dataset.current_world()
        if self._resume is not None:
            epoch, yielded = self._resume
        elif self._pos is None:
            epoch, yielded = self.epoch, 0
        else:
            epoch, yielded = self._pos
            if yielded >= self.dataset.rank_epoch(epoch, world).num_batches:
                epoch, yielded = (epoch + 1 if self._pinned is None else self._pinned), 0
        state: dict[str, Any] = {
            "version": STATE_VERSION, "epoch": epoch, "batches_yielded": yielded,
            "epoch_pinned": self._pinned is not None,
            "seed": spec.seed, "rank": world.rank, "world_size": world.world_size,
            "batch_size": spec.batch_size, "drop_last": spec.drop_last, "num_rows": spec.num_rows,
            "shuffle": spec.layout.mode, "block_rows": spec.layout.block_rows,
            "window_blocks": spec.layout.window_blocks, "shard_affinity": spec.shard_affinity,
            "affinity_group_blocks": spec.affinity_group_blocks,
        }
        if self.plan_sampler is not None and callable(getattr(self.plan_sampler, "state_dict", None)):
            state["sampler"] = self.plan_sampler.state_dict()  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next pass yields exactly the batches not yet yielded when ``state`` was taken;
        the passes after it continue as the saved loader would have."""
        mine = self.state_dict()
        missing = [k for k in ("epoch", "batches_yielded", "seed", "world_size", "batch_size") if k not in state]
        if missing:
            raise StateMismatchError(f"stream state lacks {missing}")
        fixed = ("seed", "rank", "world_size", "batch_size", "drop_last", "num_rows", "shuffle", "block_rows",
                 "window_blocks", "shard_affinity", "affinity_group_blocks")
        diff = {k: (state[k], mine[k]) for k in fixed if k in state and state[k] != mine[k]}
        if diff:
            raise StateMismatchError("stream state does not match this loader (saved, current): "
                             + ", ".join(f"{k}={v[0]!r} vs {v[1]!r}" for k, v in diff.items()))
        epoch = check_int(state["epoch"], "epoch", 0)
        yielded = check_int(state["batches_yielded"], "batches_yielded", 0)
        if "sampler" in state and self.plan_sampler is not None:
            loader = getattr(self.plan_sampler, "load_state_dict", None)
            if callable(loader):
                loader(state["sampler"])
        self._pinned = epoch if state.get("epoch_pinned") else None
        if yielded and yielded >= self.dataset.rank_epoch(epoch, self.dataset.current_world()).num_batches:
            epoch, yielded = (epoch if self._pinned is not None else epoch + 1), 0  # saved at an epoch's end
        self._resume = (epoch, yielded)
        self._pos = None
        self._next_epoch = epoch

    def update_priorities(self, ids: Any, losses: Any) -> None:
        """Feed per-row losses back to a loss-based importance sampler."""
        if not supports_priorities(self.plan_sampler):
            kind = "no sampler" if self.plan_sampler is None else type(self.plan_sampler).__name__
            raise ConfigError(f"update_priorities needs a loss-based importance sampler; this loader has {kind}")
        self.plan_sampler.update_priorities(ids, losses)  # type: ignore[union-attr]

    def stats(self) -> dict[str, Any]:
        """Rows/s, bytes per tier, prefetch stall seconds, warm hit rate, tier modes (cumulative).

        ``bytes_cold`` includes the background fill of the warm arena (``warm_filling`` says whether
        it is still running).
        """
        report = self._stats.report(self.hot_mode, self._warm_mode, self.spec.layout.mode)
        fetched = getattr(self.dataset.source, "fetch_stats", None)
        if callable(fetched) and fetched() is not None:  # remote lake: this process's node-cache downloads
            report["fetch"] = fetched()
        if self._arena is not None:
            report["bytes_cold"] = report.get("bytes_cold", 0) + self._arena.fill_bytes
            report["warm_filling"] = self._arena.filling
        return report

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Block until the warm arena's background fill (if any) is done; False if ``timeout`` passed."""
        return True if self._arena is None else self._arena.wait_filled(timeout)

    def close(self) -> None:
        """Stop every live pass's background work (and a warm arena still filling)."""
        for gen in list(self._live):
            gen.close()
        if self._arena is not None:
            self._arena.close()

    # ----------------------------------------------------------------- iteration
    def _begin_pass(self) -> tuple[int, int]:
        """(epoch, first batch) of a pass that is about to yield its first batch (see the class docstring)."""
        if self._resume is not None:
            epoch, start = self._resume
            self._resume = None
        elif self._pinned is not None:
            epoch, start = self._pinned, 0
        else:
            epoch, start = self._next_epoch, 0
        self._next_epoch = epoch + 1
        self._passes += 1
        self._pos = [epoch, start]
        return epoch, start

    def _iterate(self) -> Iterator[Any]:
        t0 = time.perf_counter()
        epoch, start = self._begin_pass()
        pass_id = self._passes
        world = self.dataset.current_world()
        self.dataset.rank_epoch(epoch, world)  # computed here once (workers inherit it)
        shared = not self._busy  # a pass overlapping a live one gets private readers and buffers
        self._busy = True
        workers: Any = None
        pipeline: Stage | None = None
        try:
            if self.num_workers == 0:
                pipeline = self._in_process_pipeline(world, shared)
                pipeline.reset({"epoch": epoch, "start": start, "next": 0})
                items: Iterator[Work] = pipeline
                post = None
            else:
                workers = self._start_workers(epoch, start, world)
                items = (work_from_item(item) for item in workers)
                post = self._post_stage()
            gather = self._gather_fn(shared)
            for work in items:
                if post is not None:
                    work = post.process(work)
                finish(work)
                for j, batch in self._split(work, epoch, world, gather):
                    if self._passes == pass_id:
                        self._pos = [epoch, j + 1]
                    yield batch
                self._stats.add(work.stats)
                self._stats.add({"busy_s": time.perf_counter() - t0})
                t0 = time.perf_counter()
        finally:
            if shared:
                self._busy = False
            if pipeline is not None:
                pipeline.shutdown()
            elif workers is not None and not self.persistent_workers:
                shutdown = getattr(workers, "_shutdown_workers", None)
                if callable(shutdown):
                    shutdown()

    def _start_workers(self, epoch: int, start: int, world: World) -> Any:
        """The DataLoader's worker iterator for one pass (workers see this pass's numbers)."""
        ds: StreamDataset = self.dataset
        ds.epoch, ds.start, ds.world = epoch, start, world
        if ds.control is not None:
            ds.control.copy_(torch.tensor([epoch, start, world.rank, world.world_size], dtype=torch.int64))
        ds._worker_side = True  # only the copies workers receive now (fork or pickle) iterate
        try:
            return super().__iter__()
        finally:
            ds._worker_side = False

    def _split(self, work: Work, epoch: int, world: World, gather: Any) -> Iterator[tuple[int, Any]]:
        names = [c.name for c in self.spec.columns]
        for j in range(work.first, work.end):
            rows = work.batch_slice(j, self.spec.batch_size)
            batch = {name: t[rows] for name, t in work.tensors.items()}
            if self.augment is not None:
                ahead = work.prepared.get(j) if work.prepared is not None else None
                batch[cols.EMBEDDING] = self._augment(batch, epoch, world.rank, j, gather, ahead)
            self._stats.add({"rows": rows.stop - rows.start, "batches": 1})
            out: Any = batch[cols.EMBEDDING] if self.return_tensor else {n: batch[n] for n in names}
            if self.pin_batches:
                out = pin_memory_tree(out)
            if self.user_collate is not None:
                out = self.user_collate(out)
            yield j, out

    def _augment(self, batch: dict[str, torch.Tensor], epoch: int, rank: int, j: int, gather: Any,
                 ahead: tuple[torch.Generator, Any] | None = None) -> torch.Tensor:
        x = batch[cols.EMBEDDING]
        if ahead is not None:  # drawn in the prefetch thread with this batch's generator (PrepareAugment)
            gen, draws = ahead
            y = self.augment(x, batch[cols.ROWS], gather, gen, prepared=draws)  # type: ignore[call-arg,misc]
        else:
            gen = batch_generator(self.spec.seed, epoch, rank, j, x.device)
            y = self.augment(x, batch[cols.ROWS], gather, gen)  # type: ignore[misc]
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise StreamError(f"augment returned {got}, expected a tensor of shape {tuple(x.shape)}")
        return y.to(torch.float32)

    # ----------------------------------------------------------------- stage wiring
    def _reader_for_stream(self) -> ColdReader:
        if self._reader is None:
            self._reader = ColdReader(self.dataset.source, [c.source for c in self.spec.gathered])
        return self._reader

    def _resident_tier(self) -> ResidentTier:
        if self._resident is None:
            reader = ColdReader(self.dataset.source, [c.source for c in self.spec.gathered])
            self._resident = ResidentTier(reader, self.spec.columns, self.device)
        return self._resident

    def _in_process_pipeline(self, world: World | None = None, shared: bool = True) -> Stage:
        """The stage chain of one pass in this process; ``shared``: lease the loader's kept readers,
        arena and output pool (else a private reader and pool, and cold reads instead of the arena)."""
        ds: StreamDataset = self.dataset
        world = ds.current_world() if world is None else world
        stage: Stage = ds.batch_stage(world)
        if self.hot_mode == RESIDENT:
            stage = ResidentStage(stage, self._resident_tier(), self.spec.columns)
        else:
            tier = self._warm_mode
            if shared:
                reader = self._reader_for_stream()
                if tier == ARENA and self._arena is None:
                    self._arena = ds.new_arena(reader, self.spec.warm_bytes)
                if self._pool is None:  # kept across iterations: its buffers are already faulted in
                    self._pool = OutputPool(self._capacity() + 4)
                arena, pool = self._arena, self._pool
            else:
                reader = ColdReader(ds.source, [c.source for c in self.spec.gathered])
                arena, pool = None, OutputPool(self._capacity() + 4)
                tier = COLD if tier == ARENA else tier
            buffers = HostBuffers(pinned=self.hot_mode == STAGED, slots=2, pool=pool)
            stage = HotStage(ds.host_stage(stage, reader, buffers, tier, arena),
                             self.spec.columns, self.device, buffers)
        if self.prefetch == 0:
            return stage
        if self._draw_ahead():
            if not shared:
                prep_reader = ColdReader(ds.source, ["mu"])
            else:
                if self._prepare_reader is None:  # its own reader: ColdReader's staging buffers are per thread
                    self._prepare_reader = ColdReader(ds.source, ["mu"])
                prep_reader = self._prepare_reader
            prep = PrepareAugment(stage, self.augment, self.spec.batch_size, self.spec.seed,  # type: ignore[arg-type]
                                  world.rank, ds.source.dim, self._make_gather(prep_reader))
            prefetcher = Prefetcher(prep, self._capacity(), self.intra_op_threads)
            prep.backlog = prefetcher.backlog
            return prefetcher
        return Prefetcher(stage, self._capacity(), self.intra_op_threads)

    def _draw_ahead(self) -> bool:
        """Whether the prefetch thread makes the augmentation's draws (CPU streams whose augmentation
        has ``prepare``; on CUDA the augmentation runs asynchronously on the device anyway)."""
        return (self.augment is not None and isinstance(self.augment, PreparedAugment)
                and self.device.type == "cpu" and self.hot_mode != RESIDENT)

    def _capacity(self) -> int:
        """Items the prefetcher keeps ready: at least ``prefetch`` batches."""
        return max(1, math.ceil(self.prefetch / self.spec.chunk_batches))

    def _post_stage(self) -> HotStage | ResidentStage | None:
        """What the consumer does to a worker's item: gather on the device, or copy it there."""
        if self.hot_mode == RESIDENT:
            return ResidentStage(None, self._resident_tier(), self.spec.columns)
        if self.device.type == "cuda":
            return HotStage(None, self.spec.columns, self.device)
        return None

    def _gather_fn(self, shared: bool = True) -> Any:
        """``gather(positions) -> float32 [n, d]`` on the device, for the augmentation hook."""
        if self.augment is None:
            return None
        if self.hot_mode == RESIDENT:
            tier = self._resident_tier()
            return lambda rows: tier.gather_mu(rows.to(tier.device))
        if not shared:
            return self._make_gather(ColdReader(self.dataset.source, ["mu"]))
        if self._gather_reader is None:
            self._gather_reader = ColdReader(self.dataset.source, ["mu"])
        return self._make_gather(self._gather_reader)

    def _make_gather(self, reader: ColdReader) -> Any:
        """``gather`` reading through ``reader`` (one reader per thread that gathers)."""
        reader.for_scattered_reads(self._arena)  # a whole-lake warm arena serves neighbour reads
        device = self.device
        mu_dtype = cols.torch_dtype(self.dataset.source.storage_dtype)
        dim = self.dataset.source.dim

        def gather(rows: torch.Tensor) -> torch.Tensor:
            idx = rows.detach().to("cpu", torch.int64).numpy()
            out = torch.empty((len(idx), dim), dtype=mu_dtype)
            reader.gather("mu", idx, out)
            return out.to(device=device, dtype=torch.float32)

        return gather
