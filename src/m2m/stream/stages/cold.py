"""Cold tier: rows read straight from the `RowSource` (memory-mapped shards), no copy kept.

`ColdReader` serves two access patterns: sequential reads of a row range (what the warm tier
loads a block with, plus ``madvise(WILLNEED)`` read-ahead of ranges needed soon), and a direct
zero-copy gather of arbitrary rows, grouped by shard with one argsort per request (used when no
warm arena fits the budget, and for augmentation's neighbour reads). `ColdStage` is the stream
stage that gathers each item directly.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from m2m.stream.columns import ROWS, WEIGHT, Column
from m2m.stream.memory import MADV_POPULATE_READ, MADV_WILLNEED, madvise
from m2m.stream.source import RowSource
from m2m.stream.stages.base import BufferSource, Stage, Work


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor over a (possibly read-only, memory-mapped) numpy array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only mappings: we never write through them
        return torch.from_numpy(array)


class ColdReader:
    """Reads rows of some source columns: sequential ranges, or a gather grouped by shard."""

    def __init__(self, source: RowSource, names: Sequence[str]) -> None:
        self.source = source
        self.offsets = np.asarray(source.shard_offsets, dtype=np.int64)
        self.num_rows = int(source.num_rows)
        self._arrays = {n: [source.column(s, n) for s in range(len(self.offsets) - 1)] for n in names}
        self._tensors = {n: [as_tensor(a) for a in arrs] for n, arrs in self._arrays.items()}
        self._staging: dict[str, torch.Tensor] = {}
        self._advised: set[tuple[int, int]] = set()

    @property
    def num_shards(self) -> int:
        return len(self.offsets) - 1

    def _shards(self, lo: int, hi: int) -> range:
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        last = int(np.searchsorted(self.offsets, hi, side="left"))
        return range(max(first, 0), min(last, self.num_shards))

    def read_rows(self, name: str, lo: int, hi: int, dst: np.ndarray) -> int:
        """Copy global rows ``[lo, hi)`` of ``name`` into ``dst`` (sequential reads); returns bytes."""
        for s in self._shards(lo, hi):
            a, b = max(lo, int(self.offsets[s])), min(hi, int(self.offsets[s + 1]))
            base = int(self.offsets[s])
            src = self._arrays[name][s][a - base: b - base]
            out = dst[a - lo: b - lo]
            if src.nbytes >= 1 << 20 and src.flags.c_contiguous:  # map the range in one call, not per page
                madvise(src.ctypes.data, src.nbytes, MADV_POPULATE_READ)
            np.copyto(out, src, casting="no")
        return int(dst[: hi - lo].nbytes)

    def willneed(self, lo: int, hi: int) -> None:
        """Start reading global rows ``[lo, hi)`` of every column into the page cache."""
        for arrays in self._arrays.values():
            for s in self._shards(lo, hi):
                arr = arrays[s]
                base = int(self.offsets[s])
                a, b = max(lo, base) - base, min(hi, int(self.offsets[s + 1])) - base
                if b > a and arr.strides[0] > 0:
                    madvise(arr.ctypes.data + a * arr.strides[0], (b - a) * arr.strides[0], MADV_WILLNEED)

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
        """``dst[i] = name[rows[i]]`` straight from the source; returns bytes read."""
        tensors = self._tensors[name]
        if self.num_shards == 1:
            torch.index_select(tensors[0], 0, torch.from_numpy(rows), out=dst)
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
            torch.index_select(tensors[s], 0, local_t[a:b], out=staging[a:b])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        torch.index_select(staging[: len(rows)], 0, torch.from_numpy(inverse), out=dst)
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
        work = next(self.upstream)
        if work.ahead is not None and self.block_rows:
            if work.epoch != self._advice_epoch:
                self.reader.forget_advice()
                self._advice_epoch = work.epoch
            self.reader.advise_blocks(np.unique(work.ahead // self.block_rows), self.block_rows)
        self.buffers.begin()
        for col in self.columns:
            dst = self.buffers.get(col, len(work.rows))
            work.count("cold_bytes", self.reader.gather(col.source, work.rows, dst))
            work.tensors[col.name] = dst
        fill_common(work, self.all_columns)
        return work
