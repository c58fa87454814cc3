"""Random access: rows by position (``lake[i]``, ``lake[i:j]``) or by id (``lake.take(ids)``).

Only the needed rows are read. Positions are grouped by shard; each fixed-width column (``id``,
``mu``, ``kappa``, ``alpha``, an int label, numeric metadata) is read with positional reads of the
byte ranges holding the needed rows (`m2m.lake.shard.ShardFile`: every block read from disk is
checked against the manifest's block checksums), in ascending row order so that rows sharing a
checksum block read it once. Other columns (string labels, string metadata) are taken from the
shard's Arrow column. Values are returned exactly as stored: ``mu`` in the lake's storage dtype,
``kappa`` as the reader sees it (an estimated sidecar value wins over the main file's), string
labels as strings.

Ids map to positions through the manifest's per-shard id ranges and the id column of the shards
they fall in (kept in a small LRU per handle and version), never through the whole lake's ids.
A remote lake's shard files come through the node cache (`m2m.lake.cache`), downloaded on first use.

With ``verify_reads`` (the default) every checksum block a read touches is read whole and checked, so
a random row costs one 256 KiB block per column, and 1,000 random rows of a lake of a few hundred MB
touch most of its blocks; with ``verify_reads=False`` only the rows' own bytes are read.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa

from m2m._validate import as_numpy, beyond_int64, integer_problem
from m2m.errors import PositionError, UnknownIdError
from m2m.lake.idmap import IdRanges, ShardIds
from m2m.lake.manifest import Manifest
from m2m.lake.reader import Snapshot
from m2m.lake.remote_files import RemoteFiles
from m2m.lake.shard import BlockCache, ColumnExtent, ShardFile, column_to_numpy, shared_open_files

_SPAN_UNIT = 256 << 10  # a gap this wide costs about one more block read: read across narrower gaps


@dataclass(frozen=True)
class Splat:
    """One row: its ``id``, ``mu`` [d] (storage dtype), ``kappa``, ``alpha``, ``label`` (None when the
    lake has no labels) and ``metadata`` (column -> value)."""

    id: int
    mu: np.ndarray
    kappa: np.float32
    alpha: np.float32
    label: Any
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The row as ``lake.splats()``'s columns hold it: ``id``, ``mu`` [d], ``kappa``, ``alpha``,
        ``label`` (when the lake has labels) and each metadata column's value."""
        out: dict[str, Any] = {"id": self.id, "mu": self.mu, "kappa": self.kappa, "alpha": self.alpha}
        if self.label is not None:
            out["label"] = self.label
        out.update(self.metadata)
        return out


@dataclass(frozen=True)
class Splats:
    """Rows as columns: ``id`` [n] int64, ``mu`` [n, d] (storage dtype), ``kappa``/``alpha`` [n]
    float32, ``label`` [n] (int64, or str objects; None without labels), ``metadata`` (name -> [n])."""

    id: np.ndarray
    mu: np.ndarray
    kappa: np.ndarray
    alpha: np.ndarray
    label: np.ndarray | None
    metadata: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.id)

    def __getitem__(self, k: int) -> Splat:
        return Splat(int(self.id[k]), self.mu[k], self.kappa[k], self.alpha[k],
                     None if self.label is None else self.label[k], {n: v[k] for n, v in self.metadata.items()})

    def __iter__(self) -> Iterator[Splat]:
        return (self[k] for k in range(len(self)))

    def to_dict(self) -> dict[str, np.ndarray]:
        """The columns as one dict (``label`` and metadata included when present)."""
        out = {"id": self.id, "mu": self.mu, "kappa": self.kappa, "alpha": self.alpha}
        if self.label is not None:
            out["label"] = self.label
        out.update(self.metadata)
        return out


def empty_dtype(m: Manifest, name: str) -> np.dtype:
    """The dtype a read of column ``name`` has when it selects no row: the one a non-empty read has (bool,
    datetime64, timedelta64 included; they were object); object for strings and what Arrow reads so."""
    dt = _fixed_dtype(m, name)
    if dt is not None or name not in m.metadata:
        return np.dtype(object) if dt is None else dt
    type_name = m.metadata[name]
    zoned = re.fullmatch(r"timestamp\[(s|ms|us|ns), tz=.*\]", type_name)  # no alias; read as naive times
    try:
        typ = pa.timestamp(zoned.group(1)) if zoned else pa.type_for_alias(type_name)
    except (ValueError, KeyError, TypeError):
        return np.dtype(object)
    return pa.array([], type=typ).to_numpy(zero_copy_only=False).dtype


def _fixed_dtype(m: Manifest, name: str) -> np.dtype | None:
    """The numpy dtype of a fixed-width column as stored (None: read it through Arrow)."""
    if name == "id":
        return np.dtype(np.int64)
    if name == "mu":
        return np.dtype(m.dtype)
    if name in ("kappa", "alpha"):
        return np.dtype(np.float32)
    if name == "label":
        return np.dtype(np.int64) if m.label_type == "int64" else None
    typ = pa.type_for_alias(m.metadata[name]) if name in m.metadata else None
    if typ is not None and (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
        return np.dtype(typ.to_pandas_dtype())
    return None


class RowReader:
    """Random access to one pinned snapshot (one per lake handle and version; see the module doc)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        m = snap.manifest
        self.manifest = m
        self._offsets = snap.shard_offsets
        self._ranges = IdRanges.of(m.shards, self._offsets)
        self._blocks = BlockCache(16)
        self._files: dict[str, ShardFile] = {}
        self._open_files = shared_open_files()   # descriptors held at most (a lake of many shards: EMFILE)
        # a remote lake's copies come and go with the node cache: held through it, never reopened by path
        self._remote = None if snap.fs.is_local else RemoteFiles(snap.fs, self._blocks)
        self._id_maps: dict[int, ShardIds] = {}  # shards with gaps in their ids: which ids each holds
        names = ["id", "mu", "kappa", "alpha"] + (["label"] if m.label_type is not None else [])
        self.columns = tuple(names + list(m.metadata))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    # ---------------------------------------------------------------- keys
    def getitem(self, key: Any) -> Splat | Splats:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.start, key.stop, key.step
            bounds = []
            for what, v in (("start", start), ("stop", stop), ("step", step)):
                k = None if v is None else _index(v)
                if v is not None and (k is None or k < 0):
                    raise PositionError(f"slice {what} {v!r} is not None or an int >= 0 (negative positions "
                                        f"are not supported; the lake has {n} rows)")
                bounds.append(k)
            start, stop, step = bounds
            if step == 0:
                raise PositionError("slice step 0 is not allowed")
            lo = 0 if start is None else min(int(start), n)
            hi = n if stop is None else min(int(stop), n)
            return self.rows(np.arange(lo, max(lo, hi), 1 if step is None else int(step), dtype=np.int64))
        k = _index(key)  # an int, numpy integer, or 0-d integer array or tensor
        if k is not None:
            if not 0 <= k < n:  # before any int64 conversion: 2**70 raised OverflowError, not PositionError
                raise self._out_of_range(k)
            return self.rows(np.asarray([k], np.int64))[0]
        big = _beyond_int64(key)
        if big is not None:  # (numpy would make the list float64 or object and the message name neither)
            raise self._out_of_range(big)
        arr = as_numpy(key, "lake[...]")
        if arr.ndim == 1 and arr.dtype.kind == "b":  # a mask over the rows, as numpy and torch index
            if arr.size != n:
                raise PositionError(f"lake[mask]: a boolean mask needs one entry per row ({n}), got {arr.size}")
            return self.rows(np.flatnonzero(arr).astype(np.int64))
        if arr.ndim != 1 or integer_problem(arr) is not None:
            what = (f"{key!r}" if arr.ndim == 0 else
                    f"{type(key).__name__} of dtype {arr.dtype} and shape {tuple(arr.shape)}")
            raise PositionError(f"lake[...] takes an int, a slice, a 1-D sequence of ints or a boolean mask, got {what}")
        big = beyond_int64(arr)
        if big is not None:  # a uint64 position above int64 wrapped negative and was named so
            raise self._out_of_range(big)
        return self.rows(self._check_positions(arr.astype(np.int64)))

    def _check_positions(self, pos: np.ndarray) -> np.ndarray:
        n = len(self)
        bad = (pos < 0) | (pos >= n)
        if bad.any():
            raise self._out_of_range(int(pos[int(np.argmax(bad))]))
        return pos

    def _out_of_range(self, p: int) -> PositionError:
        n = len(self)
        return PositionError(f"position {p} is out of range: lake version {self.manifest.version} has {n} rows "
                             f"(positions 0..{n - 1}; negative positions are not supported)")

    def take(self, ids: Any) -> Splats:
        return self.rows(self.positions(checked_ids(ids, self.manifest.version)))

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` in this version; `UnknownIdError` naming the first unknown id. Ids map
        by arithmetic in appended shards and through a `ShardIds` bitmap in shards with gaps
        (`m2m.lake.idmap`): no id column is kept, only ~0.19 B per id of a gapped shard's range."""
        pos = self._ranges.locate(ids, self._id_map)
        if (pos < 0).any():
            bad = int(ids[int(np.argmax(pos < 0))])
            raise UnknownIdError(f"id {bad} is not in lake version {self.manifest.version}")
        return pos

    def _id_map(self, s: int) -> ShardIds:
        got = self._id_maps.get(s)
        if got is None:
            entry = self.manifest.shards[s]
            got = ShardIds(self._read_column(s, "id", np.arange(entry.rows, dtype=np.int64)), entry.id_min,
                           entry.id_max)
            self._id_maps[s] = got
        return got

    # ---------------------------------------------------------------- reading
    def rows(self, pos: np.ndarray) -> Splats:
        """The rows at positions ``pos`` (checked by the caller), in that order."""
        m = self.manifest
        out: dict[str, np.ndarray] = {}
        shard = np.searchsorted(self._offsets, pos, side="right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            local = pos[sel] - self._offsets[s]
            for name in self.columns:
                vals = self._read_column(int(s), name, local)
                if name not in out:
                    out[name] = np.empty((len(pos),) + vals.shape[1:], dtype=vals.dtype)
                out[name][sel] = vals
        if not len(pos):
            for name in self.columns:
                out[name] = np.empty((0, m.dim) if name == "mu" else (0,), dtype=empty_dtype(m, name))
        return Splats(out["id"], out["mu"], out["kappa"], out["alpha"], out.get("label"),
                      {name: out[name] for name in m.metadata})

    def _read_column(self, s: int, name: str, local: np.ndarray) -> np.ndarray:
        """Column ``name`` of shard ``s`` at shard-local rows ``local`` (any order, repeats allowed)."""
        dt = _fixed_dtype(self.manifest, name)
        ext = self.snap.column_extent(s, name) if dt is not None else None
        if ext is None or dt is None:
            arr = self.snap.arrow_column(s, name).take(pa.array(local, pa.int64()))
            if name == "label" or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
                return np.asarray(arr.to_pylist(), dtype=object)
            return column_to_numpy(arr)
        width = ext.row_bytes // dt.itemsize
        uniq, inverse = np.unique(local, return_inverse=True)
        buf = np.empty((len(uniq), ext.row_bytes), np.uint8)
        self._gather(ext, uniq, buf)
        vals = buf.view(dt).reshape((len(uniq), width) if name == "mu" else (len(uniq),))
        return vals[inverse.reshape(-1)]

    def _gather(self, ext: ColumnExtent, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows ``rows`` (ascending, unique) of a fixed-width column into ``out`` [len(rows), row_bytes]."""
        if not self.snap.verify:
            # read exactly the rows' bytes; otherwise each 256 KiB block they touch is read whole and
            # checked (the cost of a random row is then a block, not a row)
            ext = replace(ext, entry=replace(ext.entry, block_bytes=None, block_crc32c=None))
        if self._remote is not None:
            self._remote.run(ext, lambda f: self._gather_from(f, ext, rows, out))
            return
        f = self._files.get(ext.path)
        if f is None:
            f = self._files[ext.path] = ShardFile(ext.path, ext.entry, cache=self._blocks, open_files=self._open_files)
        self._gather_from(f, ext, rows, out)

    @staticmethod
    def _gather_from(f: ShardFile, ext: ColumnExtent, rows: np.ndarray, out: np.ndarray) -> None:
        """`_gather` from the open file ``f`` (safe to repeat): nearby rows are read as one span (a gap
        narrower than a block costs less than another read)."""
        rb = ext.row_bytes
        gap_rows = max(1, _SPAN_UNIT // rb)
        breaks = np.flatnonzero(np.diff(rows) > gap_rows) + 1
        for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            lo, hi = int(rows[a]), int(rows[b - 1]) + 1
            if hi - lo == b - a:  # contiguous: read straight into the output
                f.read_into(ext.offset + lo * rb, out[a:b].data.cast("B"))
                continue
            span = np.empty((hi - lo) * rb, np.uint8)
            f.read_into(ext.offset + lo * rb, span.data)
            out[a:b] = span.reshape(hi - lo, rb)[rows[a:b] - lo]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._remote is not None:
            self._remote.close()


def _index(v: object) -> int | None:
    """``v`` as a Python int when it is one integer (an int, a numpy integer, a 0-d integer array or
    tensor: what ``operator.index`` takes), else None; bools are not positions."""
    if isinstance(v, (bool, np.bool_)) or str(getattr(v, "dtype", "")) in ("bool", "torch.bool"):
        return None
    if getattr(v, "ndim", 0) != 0:  # operator.index takes a one-element tensor of any shape: [3] is a list
        return None
    try:
        return operator.index(v)  # type: ignore[arg-type]
    except TypeError:
        return None


def _beyond_int64(key: object) -> int | None:
    """The first Python int of a list or tuple outside int64's range (numpy would turn the list into
    float64 or object values), or None."""
    if isinstance(key, (list, tuple)):
        for v in key:
            if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
                return v
    return None


def reader_of(lake: Any) -> RowReader:
    """The lake handle's `RowReader` of its pinned version (cached until the handle moves)."""
    cache = lake._cache
    r = cache.get("row_reader")
    if r is None or r.snap is not lake.snapshot:
        r = RowReader(lake.snapshot)
        cache["row_reader"] = r
    return r


def checked_ids(ids: Any, version: int) -> np.ndarray:
    """``ids`` (a sequence or array of integers, or one) as a 1-D int64 array, or `UnknownIdError`
    naming what is wrong: floats, strings and nested lists are refused, not cast (1.5 is no id)."""
    big = _beyond_int64(ids)
    if big is not None:
        raise UnknownIdError(f"id {big} is not in lake version {version}")
    arr = as_numpy(ids, "ids")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise UnknownIdError(f"ids must be a 1-D sequence of integers, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise UnknownIdError(f"ids must be integers, got dtype {arr.dtype}")
    big = beyond_int64(arr)
    if big is not None:
        raise UnknownIdError(f"id {big} is not in lake version {version}")
    return arr.astype(np.int64)
