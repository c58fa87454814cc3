"""Positions of ids within one shard whose ids have gaps (after a consolidation removed rows).

A shard's ids are ascending within ``[id_min, id_max]``. An appended shard holds the whole range and
maps an id by arithmetic; a shard with gaps needs to know which ids of its range it holds. Keeping
its id column for that costs 8 B a row, and a lake of such shards (a consolidated 1B-row lake whose
neighbours point everywhere) would hold the whole id column, 8 GB, in every process. `ShardIds`
keeps a bitmap over the range (1 bit an id) and the count of ids before each 64-id word (4 B per
64 ids): ~0.19 B per id of the range, so 42x less while the gaps are few. A shard whose range is far
wider than its rows (most rows removed) keeps its sorted id column instead, which is smaller there.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["IdRanges", "ShardIds"]

#: a bitmap over a range wider than this many times the rows would outgrow the id column itself
MAX_SPAN_PER_ROW = 32

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount_table(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 through a byte table (numpy < 2.0 has no ``bitwise_count``)."""
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(-1, 8)
    return _POPCOUNT8[as_bytes].sum(axis=1, dtype=np.int64)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).astype(np.int64)
    return _popcount_table(words)


class ShardIds:
    """Position within the shard of each id (``positions``), -1 where the shard does not hold it."""

    def __init__(self, ids: np.ndarray, id_min: int, id_max: int) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.id_min, self.id_max = int(id_min), int(id_max)
        span = self.id_max - self.id_min + 1
        self._sorted: np.ndarray | None = None
        if len(ids) == 0 or span > MAX_SPAN_PER_ROW * len(ids):
            self._sorted = ids.copy()
            return
        bits = np.zeros(-(-span // 64) * 64, dtype=bool)
        bits[ids - self.id_min] = True
        self._words = np.packbits(bits, bitorder="little").view(np.uint64)
        counts = _popcount(self._words)
        self._before = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32 if len(ids) < 2**31
                                                                            else np.int64)

    @property
    def nbytes(self) -> int:
        if self._sorted is not None:
            return int(self._sorted.nbytes)
        return int(self._words.nbytes + self._before.nbytes)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(len(ids), -1, dtype=np.int64)
        if self._sorted is not None:
            col = self._sorted
            if len(col):
                at = np.minimum(np.searchsorted(col, ids), len(col) - 1)
                hit = col[at] == ids
                out[hit] = at[hit]
            return out
        inside = (ids >= self.id_min) & (ids <= self.id_max)
        off = (ids[inside] - self.id_min).astype(np.uint64)
        word = (off >> np.uint64(6)).astype(np.int64)
        bit = off & np.uint64(63)
        w = self._words[word]
        present = ((w >> bit) & np.uint64(1)).astype(bool)
        below = _popcount(w & ((np.uint64(1) << bit) - np.uint64(1)))
        pos = self._before[word].astype(np.int64) + below
        idx = np.flatnonzero(inside)
        out[idx[present]] = pos[present]
        return out


class IdRanges:
    """The shards' id ranges of one version (``id_min``, ``id_max``, rows and first positions): maps ids
    to positions (`locate`) by arithmetic in shards that hold their whole range and through
    ``id_map(shard)`` (a `ShardIds`) in the others."""

    @classmethod
    def of(cls, shards: Sequence[Any], offsets: np.ndarray) -> "IdRanges":
        """Over a version's shard entries (their ``id_min``, ``id_max``, ``rows``) at ``offsets``."""
        def column(name: str) -> np.ndarray:
            return np.fromiter((getattr(e, name) for e in shards), np.int64, len(shards))
        return cls(column("id_min"), column("id_max"), column("rows"), offsets)

    def __init__(self, id_min: np.ndarray, id_max: np.ndarray, rows: np.ndarray, offsets: np.ndarray) -> None:
        self.id_min = np.asarray(id_min, dtype=np.int64)
        self.id_max = np.asarray(id_max, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.dense = self.id_max - self.id_min + 1 == np.asarray(rows, dtype=np.int64)

    def locate(self, ids: np.ndarray, id_map: Callable[[int], ShardIds]) -> np.ndarray:
        """Positions of ``ids`` (int64), -1 for ids no shard holds."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.full(len(ids), -1, dtype=np.int64)
        if not len(ids) or not len(self.id_min):
            return pos
        shard = np.searchsorted(self.id_min, ids, side="right") - 1
        inside = shard >= 0
        inside[inside] &= ids[inside] <= self.id_max[shard[inside]]
        idx = np.flatnonzero(inside)
        s_of = shard[idx]
        by_range = self.dense[s_of]
        pos[idx[by_range]] = self.offsets[s_of[by_range]] + ids[idx[by_range]] - self.id_min[s_of[by_range]]
        rest = idx[~by_range]
        if not len(rest):
            return pos
        rest = rest[np.argsort(shard[rest], kind="stable")]   # grouped by shard
        for sel in np.split(rest, np.flatnonzero(np.diff(shard[rest])) + 1):
            s = int(shard[sel[0]])
            local = id_map(s).positions(ids[sel])
            hit = local >= 0
            pos[sel[hit]] = self.offsets[s] + local[hit]
        return pos
