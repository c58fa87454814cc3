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
import time
from typing import Sequence

import numpy as np
import torch

from m2m.errors import M2MError, StreamError
from m2m.stream.columns import Column, torch_dtype
from m2m.stream.memory import collapse_huge, empty_hugepage
from m2m.stream.stages.base import BufferSource, Stage, Work
from m2m.stream.stages.cold import ColdReader, fill_common


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


FILL_WAIT_S = 600.0  # longest a gather waits for blocks another thread is loading
CONVERT_ROWS = 256  # rows gathered per piece when the gather also converts (float16 -> float32)

_pieces = threading.local()


def select_into(src: torch.Tensor, pos: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[i] = src[pos[i]]``; when ``dst``'s dtype differs (float16 storage, float32 batches) the
    rows are gathered ``CONVERT_ROWS`` at a time into a small per-thread buffer that stays in cache
    and converted from there, instead of gathering a whole item then converting it from memory."""
    if dst.dtype == src.dtype:
        torch.index_select(src, 0, pos, out=dst)
        return
    key = (src.dtype, tuple(src.shape[1:]))
    piece = getattr(_pieces, "bufs", {}).get(key)
    if piece is None:
        piece = torch.empty((CONVERT_ROWS, *src.shape[1:]), dtype=src.dtype)
        _pieces.bufs = {**getattr(_pieces, "bufs", {}), key: piece}
    for lo in range(0, len(pos), CONVERT_ROWS):
        hi = min(lo + CONVERT_ROWS, len(pos))
        torch.index_select(src, 0, pos[lo:hi], out=piece[: hi - lo])
        dst[lo:hi].copy_(piece[: hi - lo])


class WarmArena:
    """LRU cache of ``block_rows``-row blocks of some columns, in ``budget_bytes`` of RAM.

    ``huge_pages`` backs the arena with transparent huge pages: fewer TLB misses in random gathers
    (docs/tuning.md), but the kernel may compact memory while they are faulted in. An arena
    filled by `start_fill` (``collapse_after_fill``) is therefore filled on 4 KiB pages and
    collapsed into huge pages by the fill thread once complete, after the first epoch's reads;
    other arenas get huge pages when they are allocated.
    ``max_loads`` bounds the blocks one request loads when the arena holds only part of the lake:
    a request missing more is served straight from the cold tier while only that many blocks are
    loaded.

    An arena that holds the whole lake is *complete-able*: block ``b`` lives in slot ``b`` (the
    arena is the lake in row order), nothing is evicted, and any thread may load any block (a
    per-block claim says who). A gather loads the blocks it misses itself, then waits for those
    another thread is loading; `start_fill` adds a background thread loading the rest in order, so
    the first epoch's loads are shared between two threads. Every block is read from disk once,
    with its checksums checked (`ColdReader`); later epochs read only RAM.
    """

    def __init__(self, reader: ColdReader, columns: Sequence[Column], block_rows: int, budget_bytes: int,
                 huge_pages: bool = False, max_loads: int | None = None, collapse_after_fill: bool = False
                 ) -> None:
        self.reader = reader
        self.columns = tuple(c for c in columns if c.source is not None)
        self.block_rows = int(block_rows)
        self.block_bytes = self.block_rows * sum(c.row_bytes for c in self.columns)
        self.num_blocks = max(1, -(-reader.num_rows // self.block_rows))
        self.slots = int(min(self.num_blocks, budget_bytes // max(1, self.block_bytes)))
        if self.slots < 1:
            raise StreamError(f"warm budget {budget_bytes} bytes holds no block of {self.block_bytes} bytes")
        self.whole = self.slots >= self.num_blocks
        rows = reader.num_rows if self.whole else self.slots * self.block_rows
        self._collapse = huge_pages and collapse_after_fill and self.whole
        self.collapsed: bool | None = None  # whether the huge-page collapse after the fill succeeded
        if huge_pages:
            self._arena = {c.source: empty_hugepage((rows, *c.trailing), torch_dtype(c.storage_dtype),
                                                    advise=not self._collapse) for c in self.columns}
        else:
            self._arena = {c.source: _empty((rows, *c.trailing), torch_dtype(c.storage_dtype)) for c in self.columns}
        self._arena_np = {name: t.numpy() for name, t in self._arena.items()}
        self.slot_of_block = np.full(self.num_blocks, -1, dtype=np.int64)
        self.block_of_slot = np.full(self.slots, -1, dtype=np.int64)
        self._last_used = np.zeros(self.slots, dtype=np.int64)
        self._tick = 0
        self._used = 0
        self.max_loads = max_loads
        self.loads = 0
        self.evictions = 0
        # whole-lake arenas: 0 = not claimed, 1 = a thread is loading it, 2 = loaded
        self._state = np.zeros(self.num_blocks, dtype=np.int8)
        self._claim = threading.Lock()
        self._loaded = threading.Condition(self._claim)
        self._num_loaded = 0
        self._cursor = 0
        self._filler: threading.Thread | None = None
        self._filled = threading.Event()
        self._stop = threading.Event()
        self._collapser: threading.Thread | None = None
        self._fill_error: BaseException | None = None
        self.fill_bytes = 0

    # ------------------------------------------------------------ whole-lake arenas
    @property
    def complete(self) -> bool:
        """Whether the arena holds every row of the lake (gathers then read only RAM)."""
        return self.whole and self._num_loaded == self.num_blocks

    def gather_whole(self, name: str, rows: np.ndarray, dst: torch.Tensor) -> int:
        """``dst[i] = name[rows[i]]`` from a whole-lake arena, from any thread (missing blocks are
        loaded first, sharing the claims with the stream and the fill thread)."""
        if self._num_loaded < self.num_blocks:
            self._raise_fill_error()
            self._ensure_loaded(np.unique(rows // self.block_rows), None)
        torch.index_select(self._arena[name], 0, torch.from_numpy(rows), out=dst)
        return int(dst.nbytes)

    def _try_claim(self, block: int) -> bool:
        with self._claim:
            if self._state[block] != 0:
                return False
            self._state[block] = 1
            return True

    def _next_claim(self) -> int | None:
        """The next unclaimed block in order (the background fill's work list), claimed."""
        with self._claim:
            while self._cursor < self.num_blocks and self._state[self._cursor] != 0:
                self._cursor += 1
            if self._cursor >= self.num_blocks:
                return None
            block = self._cursor
            self._state[block] = 1
            return block

    def _load_claimed(self, block: int) -> int:
        """Load a claimed block into its own slot; on failure the error is kept for every waiter."""
        try:
            loaded = self._read_block(block, block)
        except BaseException as exc:
            with self._loaded:
                self._fill_error = exc
                self._loaded.notify_all()
            raise
        with self._loaded:
            self.slot_of_block[block] = block
            self._state[block] = 2
            self._num_loaded += 1
            self.loads += 1
            if self._num_loaded == self.num_blocks:
                self._filled.set()
            self._loaded.notify_all()
        return loaded

    def _raise_fill_error(self) -> None:
        exc = self._fill_error
        if exc is None:
            return
        if isinstance(exc, M2MError):
            raise exc  # CorruptShardError and friends keep their type (and name the file)
        raise StreamError(f"loading the warm arena failed: {exc!r}") from exc

    def _ensure_loaded(self, blocks: np.ndarray, work: Work | None) -> None:
        """Load the missing ``blocks`` (unique, sorted) here, then wait for those other threads load."""
        missing = blocks[self._state[blocks] != 2]
        for b in missing[::-1].tolist():  # from the top: the fill thread works up from block 0
            self._raise_fill_error()
            if self._try_claim(b):
                read = self._load_claimed(b)
                if work is not None:
                    work.count("cold_bytes", read)
        deadline = time.monotonic() + FILL_WAIT_S
        with self._loaded:
            while not (self._state[missing] == 2).all():
                self._raise_fill_error()
                if time.monotonic() > deadline:
                    raise StreamError(f"warm arena: blocks still loading after {FILL_WAIT_S:.0f} s")
                self._loaded.wait(timeout=0.05)

    def start_fill(self) -> None:
        """Load every block on a background thread, in order, sharing the work with gathers.

        Only for an arena that holds the whole lake. The first epoch's gathers load the blocks
        they need themselves; this thread loads the others meanwhile (two threads read and check).
        """
        if not self.whole:
            raise StreamError(f"start_fill needs an arena holding all {self.num_blocks} blocks, it has {self.slots}")
        if self._filler is None and not self._filled.is_set():
            self._filler = threading.Thread(target=self._fill, name="m2m-warm-fill", daemon=True)
            self._filler.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                block = self._next_claim()
                if block is None:
                    break
                self.fill_bytes += self._load_claimed(block)
        except Exception:  # noqa: BLE001 -- kept in _fill_error; every gather raises it
            return

    def pass_ended(self) -> None:
        """A pass over this arena yielded its last item: a filled arena's huge-page collapse starts
        now (on its own thread), not earlier, since it costs CPU the first epoch's gathers need."""
        if not self._collapse or self._collapser is not None or self._stop.is_set() or not self.complete:
            return
        with self._claim:
            if self._collapser is not None:
                return
            self._collapser = threading.Thread(target=self._collapse_all, name="m2m-warm-collapse", daemon=True)
            self._collapser.start()

    def _collapse_all(self) -> None:
        self.collapsed = all(collapse_huge(t, self._stop.is_set) for t in self._arena.values())

    def wait_filled(self, timeout: float | None = None) -> bool:
        """Block until a background fill is done and the filled arena collapsed into huge pages
        (True), or ``timeout`` passes (False)."""
        if self._filler is None:
            return True
        end = time.monotonic() + (FILL_WAIT_S if timeout is None else timeout)
        self._filler.join(timeout)
        if self._filler.is_alive():
            return False
        with self._loaded:  # the fill may end while a gather still loads its last claimed block
            while self._num_loaded < self.num_blocks and self._fill_error is None and time.monotonic() < end:
                self._loaded.wait(timeout=0.05)
        self.pass_ended()  # whoever waits for the arena wants it in its steady state
        if self._collapser is not None:
            self._collapser.join(max(0.0, end - time.monotonic()))
            if self._collapser.is_alive():
                return False
        return self._num_loaded == self.num_blocks or self._fill_error is not None

    @property
    def filling(self) -> bool:
        """Whether a background fill is still running."""
        return self._filler is not None and not self._filled.is_set() and self._fill_error is None

    def close(self) -> None:
        """Stop and join a background fill (and a huge-page collapse)."""
        self._stop.set()
        for thread in (self._filler, self._collapser):
            if thread is not None:
                thread.join(timeout=30)

    # ------------------------------------------------------------ every arena
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
        if self.whole:
            self._raise_fill_error()
            if self._num_loaded < self.num_blocks:
                blocks = np.unique(rows // self.block_rows)
                n_miss = int(np.count_nonzero(self._state[blocks] != 2))
                if work is not None:
                    work.count("warm_miss_blocks", n_miss)
                self._ensure_loaded(blocks, work)
            pos = torch.from_numpy(rows)
            for col in self.columns:
                dst = out[col.name]
                select_into(self._arena[col.source], pos, dst)
                if work is not None:
                    work.count("warm_bytes", dst.numel() * self._arena[col.source].element_size())
            if work is not None:
                work.count("warm_hit_rows", len(rows))
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
                    dst = out[col.name]
                    if dst.dtype != self._arena[col.source].dtype:  # cold gathers read stored bytes
                        dst = torch.empty(dst.shape, dtype=self._arena[col.source].dtype)
                    read = self.reader.gather(col.stored, rows, dst)
                    if dst is not out[col.name]:
                        out[col.name].copy_(dst)
                    if work is not None:
                        work.count("cold_bytes", read)
                return
            slot = self.slot_of_block[blocks]
        self._last_used[slot] = self._tick
        pos = torch.from_numpy(slot * self.block_rows + (rows - blocks * self.block_rows))
        for col in self.columns:
            dst = out[col.name]
            select_into(self._arena[col.source], pos, dst)
            if work is not None:
                work.count("warm_bytes", dst.numel() * self._arena[col.source].element_size())

    def _read_block(self, block: int, s: int) -> int:
        lo = block * self.block_rows
        hi = min(lo + self.block_rows, self.reader.num_rows)
        r0 = s * self.block_rows
        loaded = 0
        for col in self.columns:
            loaded += self.reader.read_rows(col.stored, lo, hi, self._arena_np[col.source][r0: r0 + hi - lo])
        self.reader.forget_advice(block, self.block_rows)
        return loaded

    def _load(self, block: int) -> int:
        """Load ``block`` into a free or the least recently used slot (partial arenas only)."""
        if self._used < self.slots:
            s = self._used
            self._used += 1
        else:
            s = int(np.argmin(self._last_used))
            if self._last_used[s] == self._tick:
                raise StreamError("warm arena: every slot is needed by the current request")
            self.slot_of_block[self.block_of_slot[s]] = -1
            self.evictions += 1
        self.slot_of_block[block] = -1
        loaded = self._read_block(block, s)
        self.slot_of_block[block] = s
        self.block_of_slot[s] = block
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
        assert self.upstream is not None
        try:
            work = next(self.upstream)
        except StopIteration:
            self.arena.pass_ended()
            raise
        if work.ahead is not None:
            self.arena.advise(work.ahead)
        self.buffers.begin()
        out = {c.name: self.buffers.get(c, len(work.rows), converting=True) for c in self.arena.columns}
        self.arena.gather(work.rows, out, work)
        work.tensors.update(out)
        fill_common(work, self.all_columns)
        return work
