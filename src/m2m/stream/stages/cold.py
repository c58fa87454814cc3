"""Cold tier: rows read from the `RowSource` with positional, checked reads; no copy kept.

A lake snapshot says where each fixed-width column lies in its shard files
(`RowSource.column_extent`); `ColdReader` then reads those bytes with ``preadv`` into the
stream's own buffers through `m2m.lake.shard.ShardFile`, which checks each block read from disk
against the manifest's crc32c. Nothing of a shard is memory-mapped, so a file truncated while an
epoch streams gives `CorruptShardError` naming it (a mapping would kill the process with SIGBUS),
and a file rewritten in place is caught by its block checksums. Sources without extents (numpy
arrays in RAM, derived columns such as string-label codes) are read from their arrays.

`ColdReader` serves two access patterns: sequential reads of a row range (what the warm tier
loads a block with, plus ``POSIX_FADV_WILLNEED`` read-ahead of ranges needed soon), and a gather
of arbitrary rows (used when no warm arena fits the budget, and for augmentation's neighbour
reads): from a complete warm arena when one is attached, else by reading the checksum blocks the
rows lie in. `ColdStage` is the stream stage that gathers each item directly.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from m2m.errors import ConfigError, CorruptShardError
from m2m.lake.remote_files import RemoteFiles
from m2m.lake.shard import BlockCache, ColumnExtent, ShardFile, shared_open_files
from m2m.stream.columns import ROWS, WEIGHT, Column
from m2m.stream.memory import (
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_WILLNEED,
    madvise,
)
from m2m.stream.source import RowSource, file_backed
from m2m.stream.stages import spare
from m2m.stream.stages.base import BufferSource, Stage, Work

T = TypeVar("T")

GATHER_STAGING_BYTES = 64 << 20  # bound on what one cold gather reads before copying rows out
CACHE_BLOCKS_PER_COLUMN = 4  # checked blocks a reader keeps per column (edges of neighbouring reads)
SCATTER_CACHE_BYTES = 64 << 20  # checked blocks kept by a reader of scattered rows (neighbour reads)
SPARSE_UNIT_ROWS = 8  # at most this many rows wanted from a run: copy those rows, not the run (docs/tuning.md)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor over a (possibly read-only, memory-mapped) numpy array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only mappings: we never write through them
        return torch.from_numpy(array)


def _read_into(f: ShardFile, start: int, view: memoryview) -> int:
    return f.read_into(start, view)


def _bytes(array: np.ndarray) -> memoryview:
    """The writable bytes of a C-contiguous array (a reshape of anything else would be a copy)."""
    if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:  # a numpy scalar would be copied
        raise ConfigError("positional reads need a C-contiguous array as destination")
    return array.reshape(-1).view(np.uint8).data


class _LazyExtents:
    """``ext[s]``: the column extent of shard ``s``, resolved (downloaded, for a remote lake) on first use."""

    def __init__(self, reader: ColdReader, name: str) -> None:
        self._reader = reader
        self._name = name
        self._got: dict[int, ColumnExtent | None] = {}

    def is_open(self, shard: int) -> bool:
        return shard in self._got

    def __getitem__(self, shard: int) -> ColumnExtent | None:
        if shard in self._got:
            return self._got[shard]
        r = self._reader
        files = file_backed(r.source)
        assert files is not None  # lazy extents exist for remote (file-backed) sources only
        ext = files.column_extent(shard, self._name)
        rows = int(r.offsets[shard + 1] - r.offsets[shard])
        if ext is not None and ext.rows != rows:
            raise CorruptShardError(f"shard file {ext.path}: column {self._name!r} has {ext.rows} rows, "
                                    f"the manifest says {rows}")
        if ext is None:  # not fixed-width (e.g. string labels as codes): the source's array
            array = r.source.column(shard, self._name)
            r._arrays[self._name][shard] = array
            r._tensors[self._name][shard] = as_tensor(array)
        self._got[shard] = ext
        return ext


class ColdReader:
    """Reads rows of some source columns: sequential ranges, or a gather grouped by shard."""

    def __init__(self, source: RowSource, names: Sequence[str]) -> None:
        self.source = source
        self.offsets = np.asarray(source.shard_offsets, dtype=np.int64)
        self.num_rows = int(source.num_rows)
        files = file_backed(source)
        extent_of = None if files is None else files.column_extent
        self._extents: dict[str, list[ColumnExtent | None]] = {}
        self._arrays: dict[str, list[np.ndarray | None]] = {}
        self._files: dict[str, ShardFile] = {}
        self._cache = BlockCache(CACHE_BLOCKS_PER_COLUMN * max(1, len(names)))
        self._open_files = shared_open_files()   # descriptors held at most (one per shard touched: EMFILE)
        # a remote lake's shards are downloaded (node cache) when first read, not all here
        self.remote = files is not None and files.is_remote
        self._staging: dict[str, torch.Tensor] = {}
        self._advised: set[tuple[int, int]] = set()
        self._arena: Any = None
        self._remote_files: RemoteFiles | None = None
        if files is not None and self.remote:
            self._remote_files = RemoteFiles(files.fs, self._cache)
            # remote columns hold lazy extent lists, which read like the list they replace
            self._extents = {n: _LazyExtents(self, n) for n in names}  # type: ignore[misc]
            self._arrays = {n: [None] * self.num_shards for n in names}
            self._tensors: dict[str, list[torch.Tensor | None]] = {n: [None] * self.num_shards for n in names}
            return
        for n in names:
            exts: list[ColumnExtent | None] = []
            arrs: list[np.ndarray | None] = []
            for s in range(self.num_shards):
                ext = extent_of(s, n) if extent_of is not None else None
                rows = int(self.offsets[s + 1] - self.offsets[s])
                if ext is not None and ext.rows != rows:
                    raise CorruptShardError(f"shard file {ext.path}: column {n!r} has {ext.rows} rows, "
                                            f"the manifest says {rows}")
                if ext is not None and ext.path not in self._files:
                    self._files[ext.path] = ShardFile(ext.path, ext.entry, cache=self._cache,
                                                      open_files=self._open_files)
                exts.append(ext)
                arrs.append(None if ext is not None else source.column(s, n))
            self._extents[n], self._arrays[n] = exts, arrs
        self._tensors = {n: [None if a is None else as_tensor(a) for a in arrs] for n, arrs in self._arrays.items()}

    @property
    def num_shards(self) -> int:
        return len(self.offsets) - 1

    @property
    def positional(self) -> bool:
        """Whether any column is read from shard files (rather than from arrays)."""
        return bool(self._files) or self.remote

    def bytes_checked(self) -> int:
        """Bytes whose block checksums this reader has checked so far."""
        remote = 0 if self._remote_files is None else self._remote_files.bytes_checked()
        return remote + sum(f.bytes_checked for f in self._files.values())

    def close(self) -> None:
        """Close the shard files (reads reopen them)."""
        for f in self._files.values():
            f.close()
        if self._remote_files is not None:
            self._remote_files.close()

    def for_scattered_reads(self, arena: Any = None) -> ColdReader:
        """Make this reader serve scattered rows (augmentation's neighbour reads): from ``arena`` (a
        `WarmArena`) when it holds the whole lake (loading the blocks a gather misses, shared with the
        stream), else through a `SCATTER_CACHE_BYTES` cache of checked blocks (a scattered row costs a
        whole block read the first time)."""
        self._arena = arena if arena is not None and arena.whole else None
        blocks = {f.block_bytes or 0 for f in self._files.values()} - {0}
        if self._arena is None and blocks:
            self._cache.max_blocks = max(self._cache.max_blocks, SCATTER_CACHE_BYTES // max(blocks))
        return self

    def _shards(self, lo: int, hi: int) -> range:
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        last = int(np.searchsorted(self.offsets, hi, side="left"))
        return range(max(first, 0), min(last, self.num_shards))

    def _with_file(self, ext: ColumnExtent, fn: Callable[[ShardFile], T]) -> T:
        """``fn(file)`` on the shard file of ``ext`` (a remote one held open while ``fn`` runs)."""
        if self._remote_files is not None:
            return self._remote_files.run(ext, fn)
        return fn(self._files[ext.path])

    def read_rows(self, name: str, lo: int, hi: int, dst: np.ndarray, fresh: bool = True) -> int:
        """Copy global rows ``[lo, hi)`` of ``name`` into ``dst`` (sequential reads); returns bytes.
        ``fresh=False``: ``dst`` was written before (its pages exist), so none are faulted in ahead."""
        for s in self._shards(lo, hi):
            a, b = max(lo, int(self.offsets[s])), min(hi, int(self.offsets[s + 1]))
            base = int(self.offsets[s])
            out = dst[a - lo: b - lo]
            ext = self._extents[name][s]
            if ext is not None:
                if out.nbytes != (b - a) * ext.row_bytes:
                    raise CorruptShardError(f"shard file {ext.path}: column {name!r} has {ext.row_bytes}-byte rows, "
                                            f"the stream expects {out.nbytes // max(1, b - a)}")
                if fresh and out.nbytes >= 1 << 20 and out.flags.c_contiguous:
                    # fault fresh destination pages (a new arena) in one call, not one per page inside
                    # the read (docs/tuning.md)
                    madvise(out.ctypes.data, out.nbytes, MADV_POPULATE_WRITE)
                self._with_file(ext, partial(_read_into, start=ext.offset + (a - base) * ext.row_bytes,
                                             view=_bytes(out)))
                continue
            # arrays of the shards in range were filled above; None only for unopened shards
            src = self._arrays[name][s][a - base: b - base]  # type: ignore[index]
            if src.nbytes >= 1 << 20 and src.flags.c_contiguous:  # map the range in one call, not per page
                madvise(src.ctypes.data, src.nbytes, MADV_POPULATE_READ)
            np.copyto(out, src, casting="no")
        return int(dst[: hi - lo].nbytes)

    def willneed(self, lo: int, hi: int) -> None:
        """Start reading global rows ``[lo, hi)`` of every column into the page cache (a remote lake:
        start downloading the shards not read yet into the node cache)."""
        files = file_backed(self.source)
        if self.remote and files is not None:
            files.prefetch_shards(list(self._shards(lo, hi)))
        for name, arrays in self._arrays.items():
            for s in self._shards(lo, hi):
                # remote: the extents are _LazyExtents (assigned in __init__)
                if self.remote and not self._extents[name].is_open(s):  # type: ignore[attr-defined]
                    continue
                base = int(self.offsets[s])
                a, b = max(lo, base) - base, min(hi, int(self.offsets[s + 1])) - base
                if b <= a:
                    continue
                ext = self._extents[name][s]
                if ext is not None:
                    if self._remote_files is not None:
                        self._remote_files.advise(ext, ext.offset + a * ext.row_bytes, (b - a) * ext.row_bytes)
                    else:
                        self._files[ext.path].advise(ext.offset + a * ext.row_bytes, (b - a) * ext.row_bytes)
                    continue
                arr = arrays[s]
                assert arr is not None
                if arr.strides[0] > 0:
                    madvise(arr.ctypes.data + a * arr.strides[0], (b - a) * arr.strides[0], MADV_WILLNEED)

    def advise_all(self) -> None:
        """Read ahead every row (a whole-lake fill is about to read them all): local files only; a
        remote lake's shards are downloaded on demand into the node cache instead."""
        if not self.remote:
            self.willneed(0, self.num_rows)

    def advise_blocks(self, blocks: np.ndarray, block_rows: int) -> None:
        """Read ahead the ``block_rows``-row blocks ``blocks`` not advised since they were last read."""
        for b in blocks.tolist():
            if (b, block_rows) in self._advised:
                continue
            self._advised.add((b, block_rows))
            self.willneed(b * block_rows, min((b + 1) * block_rows, self.num_rows))

    def forget_advice(self, block: int | None = None, block_rows: int = 0) -> None:
        """A block was read (or, with no block, an epoch began): advise it again when needed next."""
        if block is None:
            self._advised.clear()
        else:
            self._advised.discard((block, block_rows))

    def gather(self, name: str, rows: np.ndarray, dst: torch.Tensor) -> int:
        """``dst[i] = name[rows[i]]``; returns bytes read."""
        if self._arena is not None:
            return self._arena.gather_whole(name, rows, dst)
        if not self._files and not self.remote:
            return self._gather_arrays(name, rows, dst)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard).tolist():
            sel = np.flatnonzero(shard == s)
            local = rows[sel] - self.offsets[s]
            ext = self._extents[name][s]
            if ext is None:
                src = self._tensors[name][s]
                assert src is not None
                dst.index_copy_(0, torch.from_numpy(sel), torch.index_select(src, 0, torch.from_numpy(local)))
            else:
                self._with_file(ext, partial(self._gather_file, ext=ext, local=local, sel=sel, dst=dst))
        return int(dst.nbytes)

    def _gather_file(self, f: ShardFile, ext: ColumnExtent, local: np.ndarray, sel: np.ndarray,
                     dst: torch.Tensor) -> None:
        """Rows ``local`` of one shard file into ``dst[sel]``, visiting runs of rows (a checksum block's
        worth) in file order: a run holding more than `SPARSE_UNIT_ROWS` of the rows is read whole (its
        blocks checked) into a bounded staging buffer and the rows copied out; from a run holding fewer
        (scattered reads) just those rows are copied, from checked blocks kept in the reader's block
        cache. In file order, a block that two neighbouring runs share is read once either way."""
        if dst[0].numel() * dst.element_size() != ext.row_bytes:  # never reinterpret bytes as another type
            raise CorruptShardError(f"shard file {ext.path}: column has {ext.row_bytes}-byte rows, the stream "
                                    f"reads {dst[0].numel() * dst.element_size()}-byte rows ({dst.dtype})")
        unit = max(1, int(f.block_bytes or (1 << 20)) // ext.row_bytes)  # rows per read
        shard_rows = ext.rows
        units = local // unit
        order = np.lexsort((local, units))  # by run, then by row: file order
        uniq, first, counts = np.unique(units[order], return_index=True, return_counts=True)
        bounds = np.append(first, len(order))
        # a neighbour read used to copy a whole run (~256 KiB) out for one row: 2.6 GB per 100 batches of a
        # mixture stream at d = 1024 (docs/stream.md, "Scattered reads")
        rows_np = dst.numpy() if (f.block_bytes is not None and dst.is_contiguous() and len(local)
                                  and dst[0].numel() * dst.element_size() == ext.row_bytes) else None
        per_group = max(1, GATHER_STAGING_BYTES // (unit * ext.row_bytes))
        trailing = tuple(dst.shape[1:])
        key = f"file:{dst.dtype}:{trailing}"
        staging = self._staging.get(key)
        need = min(len(uniq), per_group) * unit
        if staging is None or staging.shape[0] < need:
            staging = torch.empty((need, *trailing), dtype=dst.dtype)
            self._staging[key] = staging
        staging_np = staging.numpy()
        group: list[int] = []  # runs read whole, waiting in staging (indices into uniq)

        def flush() -> None:
            for i, j in enumerate(group):
                lo, hi = int(uniq[j]) * unit, min((int(uniq[j]) + 1) * unit, shard_rows)
                f.read_into(ext.offset + lo * ext.row_bytes, _bytes(staging_np[i * unit: i * unit + hi - lo]))
            which = np.concatenate([order[bounds[j]: bounds[j + 1]] for j in group])
            slot = np.repeat(np.arange(len(group)), counts[group])
            pos = slot * unit + local[which] - units[which] * unit
            dst.index_copy_(0, torch.from_numpy(sel[which]), torch.index_select(staging, 0, torch.from_numpy(pos)))
            group.clear()

        for j in range(len(uniq)):
            if rows_np is not None and counts[j] <= SPARSE_UNIT_ROWS:
                if group:
                    flush()  # the runs before it first: blocks they share with it are then still cached
                which = order[bounds[j]: bounds[j + 1]]
                for i, r in zip(sel[which].tolist(), local[which].tolist()):
                    f.read_into(ext.offset + r * ext.row_bytes, _bytes(rows_np[i:i + 1]))  # a view, not a scalar
                continue
            group.append(j)
            if len(group) == per_group:
                flush()
        if group:
            flush()

    def _gather_arrays(self, name: str, rows: np.ndarray, dst: torch.Tensor) -> int:
        """The gather over in-memory arrays: one ``index_select`` per shard, no copy of the source."""
        tensors = self._tensors[name]
        if self.num_shards == 1:
            # shard tensors were filled before the gather; the list is Optional only until then
            spare.index_select(tensors[0], torch.from_numpy(rows), dst)  # type: ignore[arg-type]
            return int(dst.nbytes)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        order = np.argsort(shard, kind="stable")
        sorted_shard = shard[order]
        local = rows[order] - self.offsets[sorted_shard]
        bounds = np.searchsorted(sorted_shard, np.arange(self.num_shards + 1))
        staging = self._staging_for(name, dst)
        local_t = torch.from_numpy(local)
        for s in np.flatnonzero(np.diff(bounds)):
            a, b = int(bounds[s]), int(bounds[s + 1])
            # shard tensors were filled before the gather; the list is Optional only until then
            spare.index_select(tensors[s], local_t[a:b], staging[a:b])  # type: ignore[arg-type]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        spare.index_select(staging[: len(rows)], torch.from_numpy(inverse), dst)
        return int(dst.nbytes)

    def _staging_for(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._staging.get(name)
        if buf is None or buf.shape[0] < like.shape[0]:
            buf = torch.empty_like(like)
            self._staging[name] = buf
        return buf


def fill_common(work: Work, columns: Sequence[Column]) -> None:
    """Add the columns that need no gather: global rows and importance weights."""
    work.tensors[ROWS] = torch.from_numpy(work.rows)
    for col in columns:
        if col.source is None and col.name == WEIGHT:
            if work.weights is None:
                work.tensors[WEIGHT] = torch.ones(len(work.rows), dtype=torch.float32)
            else:
                work.tensors[WEIGHT] = torch.from_numpy(np.ascontiguousarray(work.weights, dtype=np.float32))


class ColdStage(Stage):
    """Gathers each item's rows directly from the source (zero copy, grouped by shard)."""

    def __init__(self, upstream: Stage, reader: ColdReader, columns: Sequence[Column], buffers: BufferSource,
                 block_rows: int = 0) -> None:
        self.upstream = upstream
        self.block_rows = block_rows
        self._advice_epoch = -1
        self.reader = reader
        self.columns = tuple(c for c in columns if c.source is not None)
        self.all_columns = tuple(columns)
        self.buffers = buffers

    def __next__(self) -> Work:
        assert self.upstream is not None
        work = next(self.upstream)
        if work.ahead is not None and self.block_rows:
            if work.epoch != self._advice_epoch:
                self.reader.forget_advice()
                self._advice_epoch = work.epoch
            self.reader.advise_blocks(np.unique(work.ahead // self.block_rows), self.block_rows)
        self.buffers.begin()
        for col in self.columns:
            dst = self.buffers.get(col, len(work.rows))
            work.count("cold_bytes", self.reader.gather(col.stored, work.rows, dst))
            work.tensors[col.name] = dst
        fill_common(work, self.all_columns)
        return work
