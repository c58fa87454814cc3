"""Warm tier: a RAM arena of fixed-size row blocks under a byte budget, least-recently-used out.

The arena is one preallocated tensor per column of ``slots * block_rows`` rows
(``slots = budget // block_bytes``, capped at the lake's block count), so its footprint is
exactly `WarmArena.nbytes` and anonymous memory never grows past it. A block is loaded with one
sequential read from the cold tier; a gather maps global rows to arena rows with vectorised
lookups and copies a whole item with one ``index_select`` per column. When the lake fits, every
block stays (the arena is the lake in RAM); otherwise the least recently used blocks not needed
by the current request are evicted.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

from m2m.errors import StreamError
from m2m.stream.columns import Column, torch_dtype
from m2m.stream.memory import empty_hugepage
from m2m.stream.stages.base import BufferSource, Stage, Work
from m2m.stream.stages.cold import ColdReader, fill_common


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


class WarmArena:
    """LRU cache of ``block_rows``-row blocks of some columns, in ``budget_bytes`` of RAM.

    ``huge_pages`` backs the arena with transparent huge pages: random gathers from it were
    1.3-1.5x faster here, but the kernel may compact memory while it first fills (a slower first epoch).
    ``max_loads`` bounds the blocks one request loads: a request missing more is served straight
    from the cold tier while only that many blocks are loaded, so a lake that fits fills the arena
    progressively during its first epoch instead of stalling the first batch on the whole copy.
    """

    def __init__(self, reader: ColdReader, columns: Sequence[Column], block_rows: int, budget_bytes: int,
                 huge_pages: bool = False, max_loads: int | None = None) -> None:
        self.reader = reader
        self.columns = tuple(c for c in columns if c.source is not None)
        self.block_rows = int(block_rows)
        self.block_bytes = self.block_rows * sum(c.row_bytes for c in self.columns)
        self.num_blocks = max(1, -(-reader.num_rows // self.block_rows))
        self.slots = int(min(self.num_blocks, budget_bytes // max(1, self.block_bytes)))
        if self.slots < 1:
            raise StreamError(f"warm budget {budget_bytes} bytes holds no block of {self.block_bytes} bytes")
        rows = self.slots * self.block_rows
        alloc = empty_hugepage if huge_pages else _empty
        self._arena = {c.source: alloc((rows, *c.trailing), torch_dtype(c.storage_dtype)) for c in self.columns}
        self._arena_np = {name: t.numpy() for name, t in self._arena.items()}
        self.slot_of_block = np.full(self.num_blocks, -1, dtype=np.int64)
        self.block_of_slot = np.full(self.slots, -1, dtype=np.int64)
        self._last_used = np.zeros(self.slots, dtype=np.int64)
        self._tick = 0
        self._used = 0
        self.max_loads = max_loads
        self.loads = 0
        self.evictions = 0
        self._filler: threading.Thread | None = None
        self._filled = threading.Event()
        self._stop = threading.Event()
        self._fill_error: BaseException | None = None
        self.fill_bytes = 0

    def start_fill(self) -> None:
        """Load every block on a background thread; until it is done, gathers read the cold tier.

        Only for an arena that holds the whole lake (nothing is evicted, so the filler owns slot
        allocation and a block becomes visible only once its copy is complete). The first epoch then
        runs at the cold-tier rate instead of waiting on page faults of the arena's first fill.
        """
        if self.slots < self.num_blocks:
            raise StreamError(f"start_fill needs an arena holding all {self.num_blocks} blocks, it has {self.slots}")
        if self._filler is None and not self._filled.is_set():
            self._filler = threading.Thread(target=self._fill, name="m2m-warm-fill", daemon=True)
            self._filler.start()

    def _fill(self) -> None:
        try:
            for block in range(self.num_blocks):
                if self._stop.is_set():
                    return
                if self.slot_of_block[block] < 0:
                    self.fill_bytes += self._load(block)
            self._filled.set()
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer, which raises it (see gather)
            self._fill_error = exc

    def wait_filled(self, timeout: float | None = None) -> bool:
        """Block until a background fill is done (True) or ``timeout`` passes (False)."""
        if self._filler is None:
            return True
        self._filler.join(timeout)
        return not self._filler.is_alive()

    @property
    def filling(self) -> bool:
        """Whether a background fill is still running."""
        return self._filler is not None and not self._filled.is_set()

    def close(self) -> None:
        """Stop and join a background fill."""
        self._stop.set()
        if self._filler is not None:
            self._filler.join(timeout=30)

    @property
    def nbytes(self) -> int:
        """Bytes the arena holds (its whole footprint)."""
        return sum(t.nbytes for t in self._arena.values())

    @property
    def resident_blocks(self) -> np.ndarray:
        return np.flatnonzero(self.slot_of_block >= 0)

    def advise(self, rows: np.ndarray) -> None:
        """Read ahead (page cache) the blocks of ``rows`` that are neither resident nor advised yet."""
        if len(rows) == 0:
            return
        blocks = np.unique(rows // self.block_rows)
        self.reader.advise_blocks(blocks[self.slot_of_block[blocks] < 0], self.block_rows)

    def gather(self, rows: np.ndarray, out: dict[str, torch.Tensor], work: Work | None = None) -> None:
        """``out[name][i] = name[rows[i]]`` for every column, loading missing blocks first."""
        if self.filling:
            if self._fill_error is not None:
                raise StreamError("the warm arena's background fill failed") from self._fill_error
            for col in self.columns:  # the same bytes, from the mapped shards, while the arena fills
                read = self.reader.gather(col.source, rows, out[col.name])
                if work is not None:
                    work.count("cold_bytes", read)
            if work is not None:
                work.count("warm_miss_rows", len(rows))
            return
        blocks = rows // self.block_rows
        self._tick += 1
        slot = self.slot_of_block[blocks]
        missing_rows = slot < 0
        n_miss = int(np.count_nonzero(missing_rows))
        if n_miss and len(np.unique(blocks)) > self.slots:  # wider than the arena: serve it in halves
            half = len(rows) // 2
            self.gather(rows[:half], {k: v[:half] for k, v in out.items()}, work)
            self.gather(rows[half:], {k: v[half:] for k, v in out.items()}, work)
            return
        if work is not None:
            work.count("warm_miss_rows", n_miss)
            work.count("warm_hit_rows", len(rows) - n_miss)
        if n_miss:
            self._last_used[slot[~missing_rows]] = self._tick
            missing = np.unique(blocks[missing_rows])
            progressive = self.max_loads is not None and len(missing) > self.max_loads
            for b in (missing[: self.max_loads] if progressive else missing).tolist():
                loaded = self._load(b)
                if work is not None:
                    work.count("cold_bytes", loaded)
            if progressive:
                for col in self.columns:
                    read = self.reader.gather(col.source, rows, out[col.name])
                    if work is not None:
                        work.count("cold_bytes", read)
                return
            slot = self.slot_of_block[blocks]
        self._last_used[slot] = self._tick
        pos = torch.from_numpy(slot * self.block_rows + (rows - blocks * self.block_rows))
        for col in self.columns:
            dst = out[col.name]
            torch.index_select(self._arena[col.source], 0, pos, out=dst)
            if work is not None:
                work.count("warm_bytes", dst.nbytes)

    def _load(self, block: int) -> int:
        if self._used < self.slots:
            s = self._used
            self._used += 1
        else:
            s = int(np.argmin(self._last_used))
            if self._last_used[s] == self._tick:
                raise StreamError("warm arena: every slot is needed by the current request")
            self.slot_of_block[self.block_of_slot[s]] = -1
            self.evictions += 1
        lo = block * self.block_rows
        hi = min(lo + self.block_rows, self.reader.num_rows)
        r0 = s * self.block_rows
        loaded = 0
        for col in self.columns:
            loaded += self.reader.read_rows(col.source, lo, hi, self._arena_np[col.source][r0: r0 + hi - lo])
        self.slot_of_block[block] = s
        self.block_of_slot[s] = block
        self.reader.forget_advice(block, self.block_rows)
        self._last_used[s] = self._tick
        self.loads += 1
        return loaded


class WarmStage(Stage):
    """Gathers each item from the warm arena (and reads ahead the rows the item says come next)."""

    def __init__(self, upstream: Stage, arena: WarmArena, columns: Sequence[Column], buffers: BufferSource) -> None:
        self.upstream = upstream
        self.arena = arena
        self.all_columns = tuple(columns)
        self.buffers = buffers

    def __next__(self) -> Work:
        work = next(self.upstream)
        if work.ahead is not None:
            self.arena.advise(work.ahead)
        self.buffers.begin()
        out = {c.name: self.buffers.get(c, len(work.rows)) for c in self.arena.columns}
        self.arena.gather(work.rows, out, work)
        work.tensors.update(out)
        fill_common(work, self.all_columns)
        return work
