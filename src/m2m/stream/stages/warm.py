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

import collections
import contextlib
import threading
import time
from typing import Sequence

import numpy as np
import torch

from m2m.errors import M2MError, StreamError, describe
from m2m.stream.columns import Column, check_range, torch_dtype
from m2m.stream.memory import collapse_huge, empty_hugepage
from m2m.stream.stages import spare
from m2m.stream.stages.base import BufferSource, Stage, Work
from m2m.stream.stages.cold import ColdReader, fill_common


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


FILL_WAIT_S = 600.0  # longest a gather waits for blocks another thread is loading
AHEAD_POLL_S = 0.5  # how often an idle load-ahead thread looks at its stop flag
AHEAD_THREADS = 1  # load-ahead threads of a partial arena (2 measured no faster on 2 cores: docs/stream.md)
CONVERT_ROWS = 256  # rows gathered per piece when the gather also converts (float16 -> float32)

_pieces = threading.local()


def select_into(src: torch.Tensor, pos: torch.Tensor, dst: torch.Tensor, name: str = "") -> None:
    """``dst[i] = src[pos[i]]``; when ``dst``'s dtype differs (float16 storage, float32 batches) the
    rows are gathered ``CONVERT_ROWS`` at a time into a small per-thread buffer that stays in cache
    and converted from there, instead of gathering a whole item then converting it from memory."""
    if dst.dtype == src.dtype:
        spare.index_select(src, pos, dst)
        return
    key = (src.dtype, tuple(src.shape[1:]))
    piece = getattr(_pieces, "bufs", {}).get(key)
    if piece is None:
        piece = torch.empty((CONVERT_ROWS, *src.shape[1:]), dtype=src.dtype)
        _pieces.bufs = {**getattr(_pieces, "bufs", {}), key: piece}
    for lo in range(0, len(pos), CONVERT_ROWS):
        hi = min(lo + CONVERT_ROWS, len(pos))
        spare.index_select(src, pos[lo:hi], piece[: hi - lo])
        if src.dtype == torch.float64:
            check_range(name, piece[: hi - lo])
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
    ``ahead`` (partial arenas): load-ahead threads load the blocks `WarmStage` says come next
    (one window ahead, in block-shuffled epochs) while gathers read the current ones, so reading and
    checking a block overlaps gathering from others (see `load_ahead`). Gathers pin the slots they
    read, so no load evicts a block under a gather.

    An arena that holds the whole lake is *complete-able*: block ``b`` lives in slot ``b`` (the
    arena is the lake in row order), nothing is evicted, and any thread may load any block (a
    per-block claim says who). A gather loads the blocks it misses itself, then waits for those
    another thread is loading; `start_fill` adds a background thread loading the rest in order, so
    the first epoch's loads are shared between two threads. Every block is read from disk once,
    with its checksums checked (`ColdReader`); later epochs read only RAM.
    """

    def __init__(self, reader: ColdReader, columns: Sequence[Column], block_rows: int, budget_bytes: int,
                 huge_pages: bool = False, max_loads: int | None = None, collapse_after_fill: bool = False,
                 ahead: bool = False) -> None:
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
        self.ahead = ahead and not self.whole
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
        # partial arenas (under _claim): gathers pin the slots they read; a slot being filled is busy
        self._written = np.zeros(self.slots, dtype=bool)  # slots whose pages a load has faulted in
        self._pins = np.zeros(self.slots, dtype=np.int32)
        self._busy = np.zeros(self.slots, dtype=bool)
        self._unused_ahead = np.zeros(self.slots, dtype=np.int64)  # 1: loaded ahead, no gather read it yet
        self._loading: dict[int, int] = {}  # block -> slot, for loads in flight
        self._queued: set[int] = set()  # blocks handed to the load-ahead thread, not yet taken
        self._loaders: list[threading.Thread] = []
        self._todo: collections.deque[int] = collections.deque()  # blocks for the load-ahead threads, in order
        self._ahead_bytes = 0  # loaded ahead, not yet counted in a gather's stats
        self.ahead_loads = 0

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
        spare.index_select(self._arena[name], torch.from_numpy(rows), dst)
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
        raise StreamError(f"loading the warm arena failed: {describe(exc)}") from exc

    def _ensure_loaded(self, blocks: np.ndarray, work: Work | None) -> None:
        """Load the missing ``blocks`` (unique, sorted) here, then wait for those other threads load."""
        missing = blocks[self._state[blocks] != 2]
        for b in missing[::-1].tolist():  # from the top: the fill thread works up from block 0
            self._raise_fill_error()
            if self._try_claim(b):
                try:
                    read = self._load_claimed(b)
                except Exception:
                    # the error every waiter sees (an M2MError as is, else a StreamError chaining it),
                    # whichever thread happened to load the block
                    self._raise_fill_error()
                    raise
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
        # every block is about to be read once: let the kernel read the files ahead, so that evicted files
        # arrive while the threads copy and check (docs/stream.md, measured); on this thread, as queuing
        # the read-ahead of a large lake can take a while. A hint: the reads raise what it would meet.
        with contextlib.suppress(Exception):
            self.reader.advise_all()
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
        """Stop and join a background fill, a huge-page collapse and the load-ahead thread."""
        self._stop.set()
        with self._loaded:
            self._loaded.notify_all()
        for thread in (self._filler, self._collapser, *self._loaders):
            # the current thread when the arena's owner was collected on it: it stops by itself
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=30)

    @property
    def failed(self) -> bool:
        """A block load failed: every later gather re-raises that error (a new arena is needed)."""
        return self._fill_error is not None

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

    def load_ahead(self, rows: np.ndarray) -> None:
        """Have the load-ahead threads load the blocks of ``rows`` (the rows a window ahead of the
        current item) that are neither resident nor on their way, while gathers go on.

        Partial arenas only (a whole-lake arena has its background fill). The new blocks are read
        ahead into the page cache at once; `AHEAD_THREADS` threads then load them in order into free
        or least recently used slots that no gather holds. Their loads are hints: a block they fail to load is left
        missing, and the gather that needs it loads it and raises the error there.
        """
        if self.whole or len(rows) == 0:
            return
        blocks = self._blocks_of(rows)
        with self._claim:
            blocks = blocks[self.slot_of_block[blocks] < 0]
            new = [b for b in blocks.tolist() if b not in self._loading and b not in self._queued]
            if not new:
                return
            self._queued.update(new)
            self._todo.extend(new)
            if not self._loaders:
                self._loaders = [threading.Thread(target=self._ahead_loop, name=f"m2m-warm-ahead-{i}", daemon=True)
                                 for i in range(AHEAD_THREADS)]
                for thread in self._loaders:
                    thread.start()
            self._loaded.notify_all()
        self.reader.advise_blocks(np.asarray(new, dtype=np.int64), self.block_rows)

    def cancel_ahead(self) -> None:
        """Drop the blocks waiting for the load-ahead threads (a pass ended or was abandoned)."""
        with self._claim:
            self._todo.clear()
            self._queued.clear()
            self._unused_ahead[:] = 0  # what was loaded for this pass is plain LRU for the next one

    def _next_ahead(self) -> tuple[int, int] | None:
        """The next queued block and the slot claimed for it; None when stopping (waits for work)."""
        with self._loaded:
            while not self._stop.is_set():
                if not self._todo:
                    self._loaded.wait(timeout=AHEAD_POLL_S)
                    continue
                b = self._todo.popleft()
                if b not in self._queued:  # cancelled, or a gather reached it first
                    continue
                self._queued.discard(b)
                if self.slot_of_block[b] >= 0 or b in self._loading:
                    continue
                s = self._claim_slot(b)
                if s is not None:
                    return b, s
        return None

    def _ahead_loop(self) -> None:
        while True:
            claimed = self._next_ahead()
            if claimed is None:
                return
            b, s = claimed
            try:
                loaded = self._read_block(b, s)
            except Exception:  # noqa: BLE001 -- a hint failed: the gather needing it loads it and raises
                self._publish(b, s, ok=False)
                continue
            self._publish(b, s, ok=True, ahead=True)
            with self._claim:
                self._ahead_bytes += loaded
                self.ahead_loads += 1

    def _blocks_of(self, rows: np.ndarray, blocks: np.ndarray | None = None) -> np.ndarray:
        """The sorted distinct blocks of ``rows`` (a mark per block when there are few blocks: no sort)."""
        blocks = rows // self.block_rows if blocks is None else blocks
        if self.num_blocks > 8 * len(blocks):
            return np.unique(blocks)
        seen = np.zeros(self.num_blocks, dtype=bool)
        seen[blocks] = True
        return np.flatnonzero(seen)

    def _claim_slot(self, block: int) -> int | None:
        """A slot for ``block`` (caller holds ``_claim``): a free one, else the least recently used one
        that no gather holds and no load fills; its block is evicted. None: every slot is taken."""
        if self._used < self.slots:
            s = self._used
            self._used += 1
        else:
            free = (self._pins == 0) & ~self._busy
            if not free.any():
                return None
            # least recently used first, but blocks loaded ahead and not used yet only after all others:
            # their load time makes them look older than the blocks gathers just left
            age = self._last_used[free] + self._unused_ahead[free] * (1 << 40)
            s = int(np.flatnonzero(free)[np.argmin(age)])
            old = int(self.block_of_slot[s])
            if old >= 0:
                self.slot_of_block[old] = -1
                self.evictions += 1
            self.block_of_slot[s] = -1
        self._busy[s] = True
        self._unused_ahead[s] = 0
        self._loading[block] = s
        return s

    def _publish(self, block: int, s: int, ok: bool, pinned: list[np.ndarray] | None = None,
                 ahead: bool = False) -> None:
        """A load into slot ``s`` ended: the block is resident (``ok``; held by the loading gather when
        it passes its ``pinned``) or the slot is left free; waiters are woken either way."""
        with self._loaded:
            del self._loading[block]
            self._busy[s] = False
            if ok:
                self.slot_of_block[block] = s
                self.block_of_slot[s] = block
                self._last_used[s] = self._tick
                self.loads += 1
                self._unused_ahead[s] = int(ahead)
                if pinned is not None:
                    self._hold(np.array([s]), pinned)
            self._loaded.notify_all()

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
            self._select(torch.from_numpy(rows), out, work)
            if work is not None:
                work.count("warm_hit_rows", len(rows))
            return
        blocks = rows // self.block_rows
        ublocks = self._blocks_of(rows, blocks)
        if len(ublocks) > self.slots:  # wider than the arena: serve it in halves
            half = len(rows) // 2
            self.gather(rows[:half], {k: v[:half] for k, v in out.items()}, work)
            self.gather(rows[half:], {k: v[half:] for k, v in out.items()}, work)
            return
        pinned: list[np.ndarray] = []
        try:
            missing = self._pin_resident(ublocks, pinned)
            if work is not None:
                n_miss = int(np.count_nonzero(np.isin(blocks, missing))) if len(missing) else 0
                work.count("warm_miss_rows", n_miss)
                work.count("warm_hit_rows", len(rows) - n_miss)
                with self._claim:
                    ahead, self._ahead_bytes = self._ahead_bytes, 0
                work.count("cold_bytes", ahead)
            if len(missing):
                progressive = self.max_loads is not None and len(missing) > self.max_loads
                loaded = self._load_missing(missing[: self.max_loads] if progressive else missing, pinned)
                if work is not None:
                    work.count("cold_bytes", loaded)
                if progressive:
                    self._gather_cold(rows, out, work)
                    return
            with self._claim:
                slot = self.slot_of_block[blocks]
            self._select(torch.from_numpy(slot * self.block_rows + (rows - blocks * self.block_rows)), out, work)
        finally:
            if pinned:
                with self._claim:
                    for slots in pinned:
                        self._pins[slots] -= 1

    def _select(self, pos: torch.Tensor, out: dict[str, torch.Tensor], work: Work | None) -> None:
        """``out[name][i] = arena[name][pos[i]]`` for every column (arena rows)."""
        for col in self.columns:
            dst = out[col.name]
            select_into(self._arena[col.source], pos, dst, col.name)
            if work is not None:
                work.count("warm_bytes", dst.numel() * self._arena[col.source].element_size())

    def _pin_resident(self, blocks: np.ndarray, pinned: list[np.ndarray]) -> np.ndarray:
        """Pin (against eviction) the slots of the resident ``blocks``, mark them used now; returns the others."""
        with self._claim:
            self._tick += 1
            if self._queued:  # a block a gather reached is no longer ahead: a late load would evict for nothing
                self._queued.difference_update(blocks.tolist())
            slots = self.slot_of_block[blocks]
            here = slots >= 0
            self._hold(slots[here], pinned)
            return blocks[~here]

    def _hold(self, slots: np.ndarray, pinned: list[np.ndarray]) -> None:
        """A gather holds ``slots`` (caller holds ``_claim``): pinned against eviction until it ends
        (``pinned`` lists them for the release), used now, no longer "loaded ahead, unused"."""
        self._pins[slots] += 1
        self._unused_ahead[slots] = 0
        self._last_used[slots] = self._tick
        pinned.append(slots)

    def _load_missing(self, blocks: np.ndarray, pinned: list[np.ndarray]) -> int:
        """Make ``blocks`` resident and pinned: load each one nobody is loading, wait for the others."""
        loaded = 0
        todo = blocks.tolist()
        deadline = time.monotonic() + FILL_WAIT_S
        while todo:
            mine: list[tuple[int, int]] = []
            with self._loaded:
                waiting = []
                for b in todo:
                    s = int(self.slot_of_block[b])
                    if s >= 0:
                        self._hold(np.array([s]), pinned)
                    elif b in self._loading:
                        waiting.append(b)
                    else:
                        claimed = self._claim_slot(b)
                        if claimed is None:
                            waiting.append(b)
                        else:
                            mine.append((b, claimed))
                if waiting and not mine:
                    if not self._loading:
                        raise StreamError("warm arena: every slot is needed by the current request")
                    if time.monotonic() > deadline:
                        raise StreamError(f"warm arena: blocks still loading after {FILL_WAIT_S:.0f} s")
                    self._loaded.wait(timeout=0.05)
            for i, (b, s) in enumerate(mine):
                try:
                    loaded += self._read_block(b, s)
                except BaseException:
                    for b2, s2 in mine[i:]:
                        self._publish(b2, s2, ok=False)
                    raise
                self._publish(b, s, ok=True, pinned=pinned)
            todo = waiting
        return loaded

    def _gather_cold(self, rows: np.ndarray, out: dict[str, torch.Tensor], work: Work | None) -> None:
        """Serve ``rows`` straight from the cold tier (a fully shuffled request missing many blocks)."""
        for col in self.columns:
            dst = out[col.name]
            if dst.dtype != self._arena[col.source].dtype:  # cold gathers read stored bytes
                dst = torch.empty(dst.shape, dtype=self._arena[col.source].dtype)
            read = self.reader.gather(col.stored, rows, dst)
            if dst is not out[col.name]:
                if out[col.name].dtype != torch.float64:
                    check_range(col.name, dst)
                out[col.name].copy_(dst)
            if work is not None:
                work.count("cold_bytes", read)

    def _read_block(self, block: int, s: int) -> int:
        lo = block * self.block_rows
        hi = min(lo + self.block_rows, self.reader.num_rows)
        r0 = s * self.block_rows
        loaded = 0
        fresh = not self._written[s]
        for col in self.columns:
            loaded += self.reader.read_rows(col.stored, lo, hi, self._arena_np[col.source][r0: r0 + hi - lo], fresh)
        self._written[s] = True
        self.reader.forget_advice(block, self.block_rows)
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
            if self.arena.ahead:
                self.arena.load_ahead(work.ahead)
            else:
                self.arena.advise(work.ahead)
        self.buffers.begin()
        out = {c.name: self.buffers.get(c, len(work.rows), converting=True) for c in self.arena.columns}
        self.arena.gather(work.rows, out, work)
        work.tensors.update(out)
        fill_common(work, self.all_columns)
        return work

    def shutdown(self) -> None:
        self.arena.cancel_ahead()  # the pass is over: what it asked to load ahead is not needed
        super().shutdown()
