"""The IterableDataset behind a `StreamLoader`, and how one process builds its stage chain.

In the consuming process (``num_workers=0``) the chain is
``BatchStage -> WarmStage|ColdStage -> HotStage -> Prefetcher`` (or ``BatchStage ->
ResidentStage -> Prefetcher`` when the lake is resident on the GPU). In a DataLoader worker it
is ``BatchStage -> WarmStage|ColdStage -> HotStage("cpu")`` and the consumer only moves items
to the device; each process's warm arena gets ``warm_bytes / num_workers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from m2m.errors import ConfigError
from m2m.sampling.plan import PlanSampler
from m2m.stream import affinity, shuffle
from m2m.stream.columns import Column
from m2m.stream.order import Layout, RankEpoch, rank_epoch, sampler_plan
from m2m.stream.source import RowSource
from m2m.stream.stages.base import Stage, Work
from m2m.stream.stages.batches import BatchStage, RowsStage
from m2m.stream.stages.cold import ColdReader, ColdStage
from m2m.stream.stages.hot import HostBuffers, HotStage, OutputPool
from m2m.stream.stages.warm import WarmArena, WarmStage
from m2m.stream.topology import World, detect_rank, detect_worker

ARENA, COLD = "arena", "cold"
WARM_MODES = ("auto", ARENA, COLD)
CHUNK_BYTES = 4 << 20
MAX_CHUNK_BATCHES = 64
PROGRESSIVE_LOADS = 16  # blocks one item may load while a fully shuffled lake fills the warm arena


@dataclass(frozen=True)
class StreamSpec:
    """Everything (picklable) that fixes what a stream yields, except the epoch, the resume point and
    the DDP topology when it is not given explicitly."""

    columns: tuple[Column, ...]
    layout: Layout
    num_rows: int
    batch_size: int
    drop_last: bool
    seed: int
    rank: int | None  # explicit values; None: read when an iteration starts (`topology.detect_rank`)
    world_size: int | None
    chunk_batches: int
    warm_bytes: int
    warm_mode: str = "auto"
    gather_in_workers: bool = True
    huge_pages: bool = True
    background_fill: bool = True
    shard_affinity: bool = False
    affinity_group_blocks: int = 0

    @property
    def gathered(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.source is not None)


def chunk_batches_for(columns: Sequence[Column], batch_size: int) -> int:
    """Batches per item: about `CHUNK_BYTES` of delivered data, at most `MAX_CHUNK_BATCHES`."""
    row = sum(c.out_row_bytes for c in columns if c.source is not None) or 1
    return int(max(1, min(MAX_CHUNK_BATCHES, CHUNK_BYTES // max(1, batch_size * row))))


def host_tier_for(spec: StreamSpec, budget: int) -> str:
    """``"arena"`` when the rows an epoch needs resident fit ``budget``, else ``"cold"`` (direct reads)."""
    if spec.warm_mode != "auto":
        return spec.warm_mode
    if spec.num_rows == 0 or spec.layout.mode == shuffle.SEQUENTIAL:
        return COLD
    block_bytes = spec.layout.block_rows * sum(c.row_bytes for c in spec.gathered)
    if block_bytes == 0:
        return COLD
    num_blocks = math.ceil(spec.num_rows / spec.layout.block_rows)
    slots = min(num_blocks, budget // block_bytes)
    if spec.layout.mode == shuffle.FULL:
        return ARENA if slots >= num_blocks else COLD
    return ARENA if slots >= min(num_blocks, 2 * spec.layout.window_blocks) else COLD


def lookahead_rows(spec: StreamSpec) -> int:
    """Rows ahead whose blocks are read ahead (one window, in block-shuffled epochs)."""
    if spec.layout.mode != shuffle.BLOCK:
        return 0
    return spec.layout.block_rows * spec.layout.window_blocks


class StreamDataset(IterableDataset):
    """The dataset of a `StreamLoader`: one rank's epoch order, and (worker side) its items.

    ``len(dataset)`` is the number of rows one rank reads in an epoch (the DDP topology read now).
    Iterating it yields internal items (runs of whole batches) and only works inside the loader's own
    DataLoader workers: wrapping it in another DataLoader (e.g. torchdata's ``StatefulDataLoader``)
    is refused with a `ConfigError`, because the loader itself is the stateful, resumable object.
    """

    def __init__(self, source: RowSource, spec: StreamSpec, sampler: PlanSampler | None = None) -> None:
        super().__init__()
        self.source = source
        self.spec = spec
        self.sampler = sampler
        self.epoch = 0
        self.start = 0
        self.world = World(0 if spec.rank is None else spec.rank, 1 if spec.world_size is None else spec.world_size)
        # persistent DataLoader workers keep their copy of this object: the loader writes each
        # iteration's (epoch, start, rank, world_size) into this shared-memory tensor instead
        self.control: torch.Tensor | None = None
        self._worker_side = False  # True only in the copy the loader's own workers receive
        self._cache: dict[tuple[int, int, int], RankEpoch] = {}

    def current_world(self) -> World:
        """The DDP topology now: the spec's explicit values, else torch.distributed / torchrun's env."""
        return detect_rank(self.spec.rank, self.spec.world_size)

    def rank_epoch(self, epoch: int, world: World | None = None) -> RankEpoch:
        """The rows and weights ``world``'s rank reads in ``epoch`` (the last two are cached)."""
        world = self.world if world is None else world
        key = (epoch, world.rank, world.world_size)
        hit = self._cache.get(key)
        if hit is None:
            s = self.spec
            plan = None if self.sampler is None else sampler_plan(self.sampler, epoch, s.num_rows, s.batch_size,
                                                                  world.world_size, s.drop_last)
            if s.shard_affinity:
                hit = affinity.rank_epoch(s.layout, self.source.shard_offsets, s.batch_size, s.drop_last, s.seed,
                                          epoch, world.rank, world.world_size, plan, s.affinity_group_blocks or None)
            else:
                hit = rank_epoch(s.layout, s.num_rows, s.batch_size, s.drop_last, s.seed, epoch, world.rank,
                                 world.world_size, plan)
            hint = getattr(self.source, "plan_prefetch", None)
            if callable(hint) and getattr(self.source, "is_remote", False):  # node cache: download ahead
                hint(affinity.first_use(hit.rows, self.source.shard_offsets))
            while len(self._cache) >= 2:  # two passes may interleave (zip(dl, dl))
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = hit
        return hit

    def __len__(self) -> int:
        """Rows of one rank's epoch (``epoch``, with the DDP topology read now)."""
        return int(len(self.rank_epoch(self.epoch, self.current_world()).rows))

    def batch_stage(self, world: World) -> BatchStage:
        def epoch_fn(epoch: int) -> RankEpoch:
            return self.rank_epoch(epoch, world)

        return BatchStage(epoch_fn, world, self.spec.chunk_batches, lookahead_rows(self.spec))

    def host_stage(self, upstream: Stage, reader: ColdReader, buffers: HostBuffers, tier: str,
                   arena: WarmArena | None = None) -> Stage:
        """The host gather stage: the warm arena, or direct cold reads."""
        if tier == ARENA:
            assert arena is not None
            return WarmStage(upstream, arena, self.spec.columns, buffers)
        return ColdStage(upstream, reader, self.spec.columns, buffers, self.spec.layout.block_rows)

    def new_arena(self, reader: ColdReader, budget: int) -> WarmArena:
        progressive = PROGRESSIVE_LOADS if self.spec.layout.mode == shuffle.FULL else None
        arena = WarmArena(reader, self.spec.gathered, self.spec.layout.block_rows, budget, self.spec.huge_pages,
                          progressive)
        if progressive is not None and arena.slots >= arena.num_blocks and self.spec.background_fill:
            arena.start_fill()
        return arena

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Worker side: this worker's items as plain dicts (tensors on the host)."""
        if not self._worker_side:
            raise ConfigError(
                "the stream's dataset yields internal items, not batches: iterate the loader that "
                "export_to_dataloader/make_loader returned (it is stateful itself: dl.state_dict() / "
                "dl.load_state_dict()); wrapping dl.dataset in another DataLoader or torchdata's "
                "StatefulDataLoader is not supported")
        return self._items()

    def _items(self) -> Iterator[dict[str, Any]]:
        epoch, start, rank_world = self.epoch, self.start, self.world
        if self.control is not None:
            e, st, r, w = (int(v) for v in self.control.tolist())
            epoch, start, rank_world = e, st, World(r, w)
        world = detect_worker(rank_world)
        stage: Stage = self.batch_stage(world)
        stage.reset({"epoch": epoch, "start": start, "next": 0})
        if self.spec.gather_in_workers:
            budget = self.spec.warm_bytes // world.num_workers
            reader = ColdReader(self.source, [c.source for c in self.spec.gathered])
            tier = host_tier_for(self.spec, budget)
            arena = self.new_arena(reader, budget) if tier == ARENA else None
            # no pooled outputs: the DataLoader moves them to shared memory the consumer keeps mapping
            buffers = HostBuffers(pool=OutputPool(size=0))
            stage = HotStage(self.host_stage(stage, reader, buffers, tier, arena), self.spec.columns,
                             torch.device("cpu"), buffers)
        else:
            stage = RowsStage(stage, self.spec.columns)
        try:
            for work in stage:
                yield {"epoch": work.epoch, "first": work.first, "end": work.end, "rows": work.rows,
                       "weights": work.weights, "tensors": work.tensors, "stats": work.stats}
        finally:
            stage.shutdown()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}  # recomputed on demand (pure function of the spec)
        return state


def work_from_item(item: dict[str, Any]) -> Work:
    """Rebuild a `Work` from what a worker yielded."""
    rows = item["rows"]
    rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    weights = item["weights"]
    if isinstance(weights, torch.Tensor):
        weights = weights.numpy()
    return Work(int(item["epoch"]), int(item["first"]), int(item["end"]), rows, weights,
                tensors=dict(item["tensors"]), stats={k: float(v) for k, v in item["stats"].items()})
