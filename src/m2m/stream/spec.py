"""What fixes a stream: `StreamSpec` (picklable; workers get it) and `plan_stream`, which derives it
from a source and a `StreamOptions` once, when the loader is made."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from m2m.errors import ConfigError, DeviceUnavailableError
from m2m.stream import columns as cols
from m2m.stream import shuffle
from m2m.stream.columns import Column
from m2m.stream.options import StreamOptions
from m2m.stream.order import Layout, choose_layout, rank_local
from m2m.stream.source import RowSource, file_backed
from m2m.stream.stages.hot import CPU, RESIDENT, STAGED, resident_bytes
from m2m.stream.topology import detect_rank

log = logging.getLogger(__name__)

ARENA, COLD = "arena", "cold"
CHUNK_BYTES = 4 << 20
MAX_CHUNK_BATCHES = 64
PASS_ITEMS = 4
"""Items a pass is cut into, about (default ``chunk_batches`` only): items of at most a quarter of the
pass, rounded up, so 4 or more items except 3 for passes of 5, 6 or 9 batches and one per batch below
4. The prefetch thread works on one item while the consumer takes the one before, so a pass of two
items (the demo's 13 batches made 2 items of ~4 MiB) left the threads taking turns. Not more: a
Langevin stream's exact reruns are made in one chain per item, and smaller items cost it more than
the overlap gains (docs/stream.md, "Items")."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything (picklable) that fixes what a stream yields, except the epoch, the resume point and
    the DDP topology when it is not given explicitly. ``lake``/``version``: the identity of the rows
    (None for an in-memory source), checked when a state is loaded."""

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
    rank_local_order: bool = False  # `m2m.stream.order.rank_local`: each rank builds only its own order
    lake: str | None = None
    version: int | str | None = None
    chunk_fixed: bool = False  # chunk_batches given by the user: every pass uses it as is

    @property
    def gathered(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.source is not None)


def chunk_batches_for(columns: Sequence[Column], batch_size: int) -> int:
    """Batches per item: about `CHUNK_BYTES` of delivered data, at most `MAX_CHUNK_BATCHES`."""
    row = sum(c.out_row_bytes for c in columns if c.source is not None) or 1
    return int(max(1, min(MAX_CHUNK_BATCHES, CHUNK_BYTES // max(1, batch_size * row))))


def pass_chunk_batches(spec: StreamSpec, num_batches: int) -> int:
    """Batches per item in a pass of ``num_batches`` batches: ``spec.chunk_batches``, lowered (unless the
    user fixed it) to ``ceil(num_batches / PASS_ITEMS)``, so that the pass has about `PASS_ITEMS` items.
    Items only group the work: what a batch holds does not depend on them."""
    if spec.chunk_fixed:
        return spec.chunk_batches
    return max(1, min(spec.chunk_batches, -(-int(num_batches) // PASS_ITEMS)))


def lake_pass_chunk_batches(spec: StreamSpec) -> int:
    """`pass_chunk_batches` of a pass over the whole lake split over the explicit world size (1 if none):
    what a loader expects before a pass's plan exists (a rank's pass may cut smaller items)."""
    return pass_chunk_batches(spec, -(-spec.num_rows // (spec.batch_size * (spec.world_size or 1))))


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


def device_of(opts: StreamOptions) -> torch.device:
    """The options' device, checked for availability now (a CUDA device without an index gets the current one)."""
    dev = opts.torch_device()
    if dev.type not in ("cpu", "cuda"):  # the stages would deliver CPU tensors, not what was asked for
        raise ConfigError(f"device {opts.device!r}: a stream delivers batches on 'cpu' or a CUDA device; stream "
                          "on 'cpu' and move each batch (batch.to(...)) for other devices")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {opts.device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def hot_mode_for(opts: StreamOptions, columns: Sequence[Column], num_rows: int, dev: torch.device) -> str:
    """Where batches are finished: "cpu", "resident" (the lake on the GPU) or "staged" (pinned copies)."""
    if opts.hot_mode == "auto":
        if dev.type != "cuda":
            return CPU
        return RESIDENT if resident_bytes(columns, num_rows) <= (opts.hot_bytes or 0) else STAGED
    if opts.hot_mode == STAGED and dev.type != "cuda":
        raise ConfigError(f"hot_mode='staged' needs a CUDA device, got {dev}")
    if opts.hot_mode == CPU and dev.type == "cuda":  # (the mode auto picks off CUDA, which docs list: accepted there)
        raise ConfigError(f"hot_mode='cpu' finishes batches on the host, but the stream delivers to {dev}: use "
                          "'resident' or 'staged', or device='cpu' and move batches yourself")
    return opts.hot_mode


def plan_stream(source: RowSource, opts: StreamOptions, dev: torch.device, lake: str | None = None,
                version: int | str | None = None) -> tuple[StreamSpec, str]:
    """The `StreamSpec` of ``source`` under ``opts`` (whose budgets are already filled) and its hot mode."""
    if opts.rank is not None or opts.world_size is not None:  # explicit values are checked now
        detect_rank(opts.rank, opts.world_size)
    resolved = cols.resolve(source, opts.columns, opts.embedding_dtype)
    hot = hot_mode_for(opts, resolved, int(source.num_rows), dev)
    warm_bytes = int(opts.warm_bytes or 0)
    row_bytes = cols.nominal_row_bytes(source)
    layout = choose_layout(source.num_rows, row_bytes, warm_bytes, opts.shuffle, opts.shuffle_mode, opts.block_rows)
    files = file_backed(source)
    remote = files is not None and files.is_remote
    affinity = opts.shard_affinity
    if affinity is None:
        affinity = layout.mode == shuffle.BLOCK and remote
    elif affinity and layout.mode != shuffle.BLOCK:
        raise ConfigError(f"shard_affinity=True needs the block shuffle; this stream's shuffle is {layout.mode!r} "
                          "(pass shuffle_mode='block')")
    group_blocks = 0  # shard affinity on a remote lake: shuffle in groups of half the node cache, which the
    cache_limit = files.open_bytes_limit if (affinity and files is not None) else None  # node's ranks share
    if cache_limit:  # rounded down to a power of two: a budget taken from free disk space moves a little
        cache_limit = 1 << (int(cache_limit).bit_length() - 1)  # between processes (see Findings: resume)
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # set by torchrun
        group_blocks = max(layout.window_blocks,
                           (cache_limit // (2 * local_ranks)) // max(1, layout.block_rows * row_bytes))
    if layout.mode == shuffle.BLOCK:
        warn_narrow_window(source, layout)
    return StreamSpec(
        columns=resolved, layout=layout, num_rows=int(source.num_rows), batch_size=opts.batch_size,
        drop_last=opts.drop_last, seed=int(opts.seed or 0), rank=opts.rank, world_size=opts.world_size,
        chunk_batches=opts.chunk_batches or chunk_batches_for(resolved, opts.batch_size), warm_bytes=warm_bytes,
        warm_mode=opts.warm_mode, gather_in_workers=hot != RESIDENT, huge_pages=opts.huge_pages,
        background_fill=opts.background_fill, shard_affinity=bool(affinity),
        affinity_group_blocks=int(group_blocks), rank_local_order=rank_local(int(source.num_rows)), lake=lake,
        version=version, chunk_fixed=opts.chunk_batches is not None), hot


def warn_narrow_window(source: RowSource, layout: Layout) -> None:
    """One warning when a block shuffle's window holds fewer rows than a shard: batches then mix rows of
    few places of the lake (a lake written class by class gives batches of one or two classes)."""
    offsets = source.shard_offsets
    shard_rows = int(max((int(offsets[i + 1] - offsets[i]) for i in range(len(offsets) - 1)), default=0))
    window = layout.block_rows * layout.window_blocks
    if shard_rows > window:
        log.warning("block shuffle: a window mixes %d rows (%d block(s) of %d rows) but a shard holds up to %d: "
                    "batches draw from few places of the lake; raise warm_bytes (a window is a quarter of it), "
                    "lower block_rows, or pass shuffle_mode='full' if the lake fits in RAM",
                    window, layout.window_blocks, layout.block_rows, shard_rows)
