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
import weakref
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from m2m._validate import check_int
from m2m.errors import ConfigError, DeviceUnavailableError, StreamError
from m2m.sampling.plan import PlanSampler, supports_priorities
from m2m.stream import columns as cols
from m2m.stream import shuffle as shuffle_mod
from m2m.stream.dataset import (
    ARENA,
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
                columns: Sequence[str] | None = None, device: str | torch.device = "cpu", seed: int = 0,
                epoch: int = 0, rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                warm_bytes: int, hot_bytes: int, prefetch: int = 4, sampler: PlanSampler | None = None,
                augment: Augment | None = None, shuffle_mode: str = "auto", block_rows: int | None = None,
                warm_mode: str = "auto", hot_mode: str = "auto", chunk_batches: int | None = None,
                intra_op_threads: int | None = 1, huge_pages: bool = True,
                background_fill: bool = True, shard_affinity: bool | None = None) -> "StreamLoader":
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
    """
    if not isinstance(source, RowSource):
        raise ConfigError(f"source must implement RowSource, got {type(source).__name__}")
    batch_size = check_int(batch_size, "batch_size", 1)
    seed = check_int(seed, "seed", 0)
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
        raise ConfigError(f"sampler must have a plan(epoch) method, got {type(sampler).__name__}")
    dev = _device(device)
    world = detect_rank(rank, world_size)
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
        drop_last=bool(drop_last), seed=seed, rank=world.rank, world_size=world.world_size,
        chunk_batches=chunk_batches or chunk_batches_for(resolved, batch_size), warm_bytes=warm_bytes,
        warm_mode=warm_mode, gather_in_workers=hot != RESIDENT, huge_pages=bool(huge_pages),
        background_fill=bool(background_fill), shard_affinity=bool(shard_affinity),
        affinity_group_blocks=int(group_blocks))
    dataset = StreamDataset(source, spec, sampler)
    return StreamLoader(dataset, device=dev, num_workers=num_workers, prefetch=prefetch, augment=augment,
                        hot_mode=hot, return_tensor=columns is None, epoch=epoch,
                        intra_op_threads=intra_op_threads)


class StreamLoader(DataLoader):
    """A `torch.utils.data.DataLoader` whose dataset yields whole batches (``batch_size=None``)."""

    def __init__(self, dataset: StreamDataset, *, device: torch.device, num_workers: int, prefetch: int,
                 augment: Augment | None, hot_mode: str, return_tensor: bool, epoch: int = 0,
                 intra_op_threads: int | None = 1) -> None:
        spec = dataset.spec
        extra: dict[str, Any] = {}
        if num_workers > 0:
            extra = {"prefetch_factor": max(1, math.ceil(prefetch / (spec.chunk_batches * num_workers))),
                     "pin_memory": device.type == "cuda", "persistent_workers": False}
        super().__init__(dataset, batch_size=None, shuffle=None, num_workers=num_workers, **extra)
        self.spec = spec
        self.device = device
        self.prefetch = prefetch
        self.augment = augment
        self.hot_mode = hot_mode
        self.return_tensor = return_tensor
        self.intra_op_threads = intra_op_threads
        self.plan_sampler = dataset.sampler
        self._epoch = epoch
        self._yielded = 0
        self._stats = StreamStats()
        self._reader: ColdReader | None = None
        self._gather_reader: ColdReader | None = None
        self._prepare_reader: ColdReader | None = None
        self._arena: WarmArena | None = None
        self._resident: ResidentTier | None = None
        self._pool: OutputPool | None = None
        self._warm_mode = host_tier_for(spec, spec.warm_bytes // max(1, num_workers))
        self._active: weakref.ref[Any] | None = None

    # ----------------------------------------------------------------- public surface
    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.dataset.rank_epoch(self._epoch).num_batches

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._close_active()
        gen = self._iterate(self._epoch, self._yielded)
        self._active = weakref.ref(gen)
        return gen

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self._close_active()
        self._epoch = check_int(epoch, "epoch", 0)
        self._yielded = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: epoch, batches yielded, and the numbers that fix the order."""
        spec = self.spec
        state: dict[str, Any] = {
            "version": STATE_VERSION, "epoch": self._epoch, "batches_yielded": self._yielded,
            "seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size,
            "batch_size": spec.batch_size, "drop_last": spec.drop_last, "num_rows": spec.num_rows,
            "shuffle": spec.layout.mode, "block_rows": spec.layout.block_rows,
            "window_blocks": spec.layout.window_blocks, "shard_affinity": spec.shard_affinity,
            "affinity_group_blocks": spec.affinity_group_blocks,
        }
        if self.plan_sampler is not None and callable(getattr(self.plan_sampler, "state_dict", None)):
            state["sampler"] = self.plan_sampler.state_dict()  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields exactly the batches not yet yielded when ``state`` was taken."""
        mine = self.state_dict()
        missing = [k for k in ("epoch", "batches_yielded", "seed", "world_size", "batch_size") if k not in state]
        if missing:
            raise ValueError(f"stream state lacks {missing}")
        fixed = ("seed", "rank", "world_size", "batch_size", "drop_last", "num_rows", "shuffle", "block_rows",
                 "window_blocks", "shard_affinity", "affinity_group_blocks")
        diff = {k: (state[k], mine[k]) for k in fixed if k in state and state[k] != mine[k]}
        if diff:
            raise ValueError("stream state does not match this loader (saved, current): "
                             + ", ".join(f"{k}={v[0]!r} vs {v[1]!r}" for k, v in diff.items()))
        self._close_active()
        self._epoch = check_int(state["epoch"], "epoch", 0)
        self._yielded = check_int(state["batches_yielded"], "batches_yielded", 0)
        if "sampler" in state and self.plan_sampler is not None:
            loader = getattr(self.plan_sampler, "load_state_dict", None)
            if callable(loader):
                loader(state["sampler"])

    def update_priorities(self, ids: Any, losses: Any) -> None:
        """Feed per-row losses back to a loss-based importance sampler."""
        if not supports_priorities(self.plan_sampler):
            kind = "no sampler" if self.plan_sampler is None else type(self.plan_sampler).__name__
            raise ValueError(f"update_priorities needs a loss-based importance sampler; this loader has {kind}")
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
        """Stop a running iteration's background work (and a warm arena still filling)."""
        self._close_active()
        if self._arena is not None:
            self._arena.close()

    # ----------------------------------------------------------------- iteration
    def _close_active(self) -> None:
        gen = self._active() if self._active is not None else None
        self._active = None
        if gen is not None:
            gen.close()

    def _iterate(self, epoch: int, start: int) -> Iterator[Any]:
        t0 = time.perf_counter()
        self.dataset.rank_epoch(epoch)  # computed here once (workers inherit it)
        if self.num_workers == 0:
            pipeline: Stage = self._in_process_pipeline()
            pipeline.reset({"epoch": epoch, "start": start, "next": 0})
            items: Iterator[Work] = pipeline
            post = None
        else:
            self.dataset.epoch, self.dataset.start = epoch, start
            pipeline = None  # type: ignore[assignment]
            workers = super().__iter__()
            items = (work_from_item(item) for item in workers)
            post = self._post_stage()
        gather = self._gather_fn()
        try:
            for work in items:
                if post is not None:
                    work = post.process(work)
                finish(work)
                yield from self._split(work, epoch, gather)
                self._stats.add(work.stats)
                self._stats.add({"busy_s": time.perf_counter() - t0})
                t0 = time.perf_counter()
            self._epoch, self._yielded = epoch + 1, 0
        finally:
            if pipeline is not None:
                pipeline.shutdown()
            else:
                shutdown = getattr(workers, "_shutdown_workers", None)
                if callable(shutdown):
                    shutdown()

    def _split(self, work: Work, epoch: int, gather: Any) -> Iterator[Any]:
        names = [c.name for c in self.spec.columns]
        for j in range(work.first, work.end):
            rows = work.batch_slice(j, self.spec.batch_size)
            batch = {name: t[rows] for name, t in work.tensors.items()}
            if self.augment is not None:
                ahead = work.prepared.get(j) if work.prepared is not None else None
                batch[cols.EMBEDDING] = self._augment(batch, epoch, j, gather, ahead)
            self._yielded = j + 1
            self._stats.add({"rows": rows.stop - rows.start, "batches": 1})
            yield batch[cols.EMBEDDING] if self.return_tensor else {n: batch[n] for n in names}

    def _augment(self, batch: dict[str, torch.Tensor], epoch: int, j: int, gather: Any,
                 ahead: tuple[torch.Generator, Any] | None = None) -> torch.Tensor:
        x = batch[cols.EMBEDDING]
        if ahead is not None:  # drawn in the prefetch thread with this batch's generator (PrepareAugment)
            gen, draws = ahead
            y = self.augment(x, batch[cols.ROWS], gather, gen, prepared=draws)  # type: ignore[call-arg,misc]
        else:
            gen = batch_generator(self.spec.seed, epoch, self.spec.rank, j, x.device)
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

    def _in_process_pipeline(self) -> Stage:
        ds: StreamDataset = self.dataset
        stage: Stage = ds.batch_stage(World(self.spec.rank, self.spec.world_size))
        if self.hot_mode == RESIDENT:
            stage = ResidentStage(stage, self._resident_tier(), self.spec.columns)
        else:
            reader = self._reader_for_stream()
            if self._warm_mode == ARENA and self._arena is None:
                self._arena = ds.new_arena(reader, self.spec.warm_bytes)
            if self._pool is None:  # kept across iterations: its buffers are already faulted in
                self._pool = OutputPool(self._capacity() + 4)
            buffers = HostBuffers(pinned=self.hot_mode == STAGED, slots=2, pool=self._pool)
            stage = HotStage(ds.host_stage(stage, reader, buffers, self._warm_mode, self._arena),
                             self.spec.columns, self.device, buffers)
        if self.prefetch == 0:
            return stage
        if self._draw_ahead():
            if self._prepare_reader is None:  # its own reader: ColdReader's staging buffers are per thread
                self._prepare_reader = ColdReader(self.dataset.source, ["mu"])
            prep = PrepareAugment(stage, self.augment, self.spec.batch_size, self.spec.seed,  # type: ignore[arg-type]
                                  self.spec.rank, self.dataset.source.dim, self._make_gather(self._prepare_reader))
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

    def _gather_fn(self) -> Any:
        """``gather(positions) -> float32 [n, d]`` on the device, for the augmentation hook."""
        if self.augment is None:
            return None
        if self.hot_mode == RESIDENT:
            tier = self._resident_tier()
            return lambda rows: tier.gather_mu(rows.to(tier.device))
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
