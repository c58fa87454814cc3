"""A pinned, read-only view of one lake version: the `RowSource` streams and queries read from."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from m2m._forksafe import ForkSafeLock
from m2m.errors import ConfigError, CorruptShardError, UnknownColumnError, UnknownIdError
from m2m.lake.fs import LakeFS
from m2m.lake.idmap import IdRanges, ShardIds
from m2m.lake.integrity import check_batch, check_file, check_footers, check_key, file_name
from m2m.lake.manifest import FileEntry, Manifest, shard_row_counts
from m2m.lake.schema import (
    MAIN_COLUMNS,
    MU_NORM,
    NEIGHBOR_COS,
    NEIGHBORS,
    read_dtype,
    read_in_memory,
    widened_dtype,
)
from m2m.lake.shard import (
    ColumnExtent,
    column_extents,
    column_to_numpy,
    open_shard_file,
    opened_shard,
    read_column,
)

BUILTIN_COLUMNS = MAIN_COLUMNS
# Whole shard files a local snapshot keeps in memory (string columns, `to_arrow`'s opener is separate):
# the least recently used beyond this are dropped (their arrays stay valid while referenced).
LOCAL_OPEN_BYTES = 512 << 20




class Snapshot:
    """One committed version of a lake. Columns come back as numpy arrays read from the shard files
    with positional reads (`m2m.lake.shard`): fixed-width columns alone, each block checked against
    the manifest's crc32c; others from the whole file read into private memory. Nothing is
    memory-mapped, so a shard cut short under a reader is `CorruptShardError`, never SIGBUS.

    String labels are exposed as int64 codes into ``manifest.label_vocabulary``; the geometry
    sidecar's neighbour ids are exposed as global row positions (-1 where missing). Shard files are
    verified against their CRC32 on first use when ``verify`` is true; ``verified`` (paths already
    checked) may be shared between snapshots so that a file is checked once per holder of the set.

    Every file's Arrow footer is cross-checked against the manifest (rows, column types, dim, dtype,
    first/last id; `m2m.lake.integrity`): for a local lake of format 1 or 2 when the snapshot is
    made; for a remote one, or a local one of format 3 (segmented manifests, lakes of more than
    `m2m.lake.manifest.SEGMENT_SHARDS` shards), when the file is first used, so opening a version
    does not touch every file. ``checked`` (the `check_key`
    of each file already cross-checked) may be shared like ``verified``. A mismatch raises
    `CorruptShardError` naming the file.
    """

    def __init__(self, fs: LakeFS, manifest: Manifest, verify: bool = True, verified: set[str] | None = None,
                 checked: set[tuple[object, ...]] | None = None) -> None:
        self.fs = fs
        self.manifest = manifest
        self.verify = verify
        self._verified: set[str] = set() if verified is None else verified
        self._checked: set[tuple[object, ...]] = set() if checked is None else checked
        if fs.is_local and manifest.format_version < 3:  # footers only: a few small reads per file
            check_footers(fs, manifest, self._checked)  # (format 3, a lake of many shards: on first use)
        # the shards' row offsets: computed on first use (a format-3 lake's segments load then, not at open)
        self._offsets_memo: np.ndarray | None = None
        self._batches: OrderedDict[str, pa.RecordBatch] = OrderedDict()
        self._batch_bytes: dict[str, int] = {}
        self._prefetch_plan: tuple[list[int], dict[int, int]] | None = None   # remote: a stream's shard order
        self._file_shard: dict[str, int] | None = None
        self._derived: dict[tuple[int, str], np.ndarray] = {}
        self._extents: dict[str, dict[str, ColumnExtent]] = {}
        self._footer_ok: set[str] = set()  # files `_check_footer` passed for this manifest
        self._ids: np.ndarray | None = None
        self._id_range: IdRanges | None = None   # the shards' id ranges (`_locate`)
        self._id_maps: dict[int, ShardIds] = {}  # shards with gaps in their ids: which ids each holds
        self._lock = ForkSafeLock(reentrant=True)

    # RowSource protocol
    @property
    def _offsets(self) -> np.ndarray:
        got = self._offsets_memo
        if got is None:
            with self._lock:
                got = self._offsets_memo
                if got is None:
                    counts = shard_row_counts(self.fs, self.manifest)
                    got = self._offsets_memo = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return got

    @property
    def num_rows(self) -> int:
        """Rows in this version."""
        return self.manifest.rows

    @property
    def dim(self) -> int:
        """The vector dimension of ``mu``."""
        return self.manifest.dim

    @property
    def storage_dtype(self) -> np.dtype:
        """The element type ``mu`` is stored in (float32 or float16)."""
        return np.dtype(self.manifest.dtype)

    @property
    def shard_offsets(self) -> np.ndarray:
        """Row position where each shard starts, plus the total: int64 [num_shards + 1]."""
        return self._offsets

    @property
    def column_names(self) -> Sequence[str]:
        """Columns readable from this version: the built-in ones, ``label`` if any, and the metadata."""
        names = list(BUILTIN_COLUMNS)
        if self.manifest.label_type is not None:
            names.append("label")
        if self.manifest.geometry is not None:
            names += ["neighbors", "neighbor_cos"]
        return tuple(names + list(self.manifest.metadata))

    @property
    def version(self) -> int:
        """The manifest version this snapshot reads."""
        return self.manifest.version

    @property
    def snapshot_key(self) -> str:
        """The version and its commit time: two copies of a lake that each committed a version of the
        same number (a restored backup, a copied folder, both appended to) tell their rows apart by it."""
        return f"v{self.manifest.version}@{self.manifest.created!r}"

    def column_sample(self, name: str) -> np.ndarray | None:
        """An empty array with the dtype and trailing shape `column` gives ``name``, from the manifest
        alone (no file read), or None when the manifest does not say. A stream learns its columns'
        types so: reading them from shard 0 downloaded that whole shard on every rank of a remote
        lake, one shard each rank never read otherwise (2026-12-06)."""
        fixed = {"id": np.int64, "kappa": np.float32, "alpha": np.float32, "label": np.int64,
                 MU_NORM: np.float64}
        if name == "mu":
            return np.empty((0, self.dim), dtype=self.storage_dtype)
        if name == "label" and self.manifest.label_type is None:
            return None
        if name in fixed:
            return np.empty(0, dtype=fixed[name])
        if name in (NEIGHBORS, NEIGHBOR_COS) and self.manifest.geometry is not None:
            return np.empty((0, self._k), dtype=np.int64 if name == NEIGHBORS else np.float32)
        type_name = self.manifest.metadata.get(name)
        dtype = None if type_name is None else read_dtype(type_name)
        return None if dtype is None else np.empty(0, dtype=dtype)

    def column(self, shard: int, name: str) -> np.ndarray:
        """Column ``name`` of shard ``shard`` as numpy (fixed-width columns: a fresh array of that
        column's bytes alone, read and checked now).

        Rows appended after the last ``estimate_kappa`` have no geometry sidecar: their ``neighbors``
        read as -1 (no neighbour, as for a neighbour whose row is gone), ``neighbor_cos`` as NaN, and
        ``kappa`` (stored with the rows) as NaN, the same rows `to_arrow` gives as nulls."""
        if name == "label" and self.manifest.label_type == "string":
            return self._cached(shard, name, self._label_codes)
        if name == "neighbors":
            return self._cached(shard, name, self._neighbor_positions)
        if name == "neighbor_cos" and self._without_geometry(shard, name):
            return self._cached(shard, name, lambda s: np.full((self.manifest.shards[s].rows, self._k), np.nan,
                                                               dtype=np.float32))
        values = self._stored(shard, name)
        if values.dtype.kind in "mM":  # timestamps and durations: their int64 counts (a view)
            return values.view(np.int64)
        wide = widened_dtype(values.dtype)
        if wide != values.dtype:  # unsigned ints torch cannot gather: a signed type holding every value
            return self._cached(shard, name, lambda s: _widen(values, wide, name, s))
        return values

    def stored_column(self, shard: int, name: str) -> np.ndarray:
        """Like `column`, but metadata in its stored dtype (uint16 stays uint16, timestamps datetime64)."""
        if name in self.manifest.metadata:
            return self._stored(shard, name)
        return self.column(shard, name)

    def _stored(self, shard: int, name: str) -> np.ndarray:
        """Column ``name`` of shard ``shard`` as stored (fixed-width: that column's bytes alone, read now)."""
        try:
            f = self.manifest.shards[shard].file_for(name)
        except KeyError:
            raise self._unknown(shard, name) from None
        return self._file_column(f, name)

    def column_extent(self, shard: int, name: str) -> ColumnExtent | None:
        """Where column ``name`` of shard ``shard`` lies in its file, for positional, checked reads
        (`m2m.lake.shard.ShardFile`); None for columns computed in memory or not fixed-width.

        Files with block checksums are checked block by block as they are read; older files get
        their whole-file CRC32 checked here once, as `column` does.
        """
        if name == "neighbors" or (name == "label" and self.manifest.label_type == "string"):
            return None
        if name == "neighbor_cos" and self._without_geometry(shard, name):
            return None  # filled in memory by `column`
        if read_in_memory(self.manifest.metadata.get(name)):
            return None  # widened in memory by `column`
        entry = self.manifest.shards[shard]
        try:
            f = entry.file_for(name)
        except KeyError:
            raise self._unknown(shard, name) from None
        return self._extents_of(f).get(name)

    def _extents_of(self, f: FileEntry) -> dict[str, ColumnExtent]:
        if f.block_crc32c is None and self.verify and f.path not in self._verified:
            self._batch(f)  # an older file: its whole-file CRC32, once
        self._check_footer(f)
        with self._lock:
            extents = self._extents.get(f.path)
            if extents is None:
                extents = column_extents(self.fs, f)
                self._extents[f.path] = extents
        return extents

    def _file_column(self, f: FileEntry, name: str) -> np.ndarray:
        """Column ``name`` of file ``f``: a positional read of its bytes alone when it is fixed-width
        (null-free, numpy-typed), else from the whole file read into memory."""
        ext = self._extents_of(f).get(name)
        if ext is None or not ext.dtype:
            return column_to_numpy(self._batch(f).column(name))
        with opened_shard(self.fs, f) as sf:
            return read_column(sf, ext)

    def _check_footer(self, f: FileEntry, batch: pa.RecordBatch | None = None) -> None:
        """`check_batch` of ``f`` (its footer, ids, lake id and kappa run against this manifest) once per
        `check_key`: of ``batch`` when the file was read whole, else of its footer read here, before any
        positional read of it. The reads by extent (random access, the stream) had skipped it for remote
        and format-3 lakes, whose footers are not checked at open, so a manifest edited with its hash
        recomputed (two shards' files swapped) served other rows (observed)."""
        if f.path in self._footer_ok:  # (this snapshot's manifest checked it: no key to build per read)
            return
        shard = self._shard_of_file()[f.path]
        key = check_key(self.manifest, shard, f)
        if key not in self._checked:
            if batch is None:
                check_file(self.fs, self.manifest, shard, f)
            else:
                check_batch(self.manifest, shard, f, batch, file_name(self.fs, f.path))
            self._checked.add(key)
        self._footer_ok.add(f.path)

    def arrow_column(self, shard: int, name: str) -> pa.Array:
        """Column ``name`` of shard ``shard`` as the stored Arrow array."""
        entry = self.manifest.shards[shard]
        try:
            f = entry.file_for(name)
        except KeyError:
            raise self._unknown(shard, name) from None
        return self._batch(f).column(name)

    def read_main(self, name: str, shards: Sequence[int] | None = None) -> np.ndarray:
        """Column ``name`` over the whole snapshot (or the given shard positions) as the appends wrote
        it (ignoring sidecars; a copy)."""
        entries = self.manifest.shards if shards is None else [self.manifest.shards[i] for i in shards]
        return np.concatenate([self._file_column(s.files[0], name) for s in entries])

    def norms(self) -> np.ndarray:
        """Every row's ``mu_norm`` (input = mu * mu_norm) in position order, float64; 1.0 for rows of
        shards written before norms were kept."""
        parts = []
        for s, entry in enumerate(self.manifest.shards):
            try:
                f = entry.file_for(MU_NORM)
            except KeyError:
                parts.append(np.ones(entry.rows, dtype=np.float64))
                continue
            parts.append(self._file_column(f, MU_NORM).astype(np.float64, copy=False))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    # whole-snapshot helpers
    def ids(self) -> np.ndarray:
        """All row ids in position order (ascending)."""
        with self._lock:
            if self._ids is None:
                parts = [self.column(s, "id") for s in range(len(self.manifest.shards))]
                self._ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            return self._ids

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ``ids``; `KeyError` naming the first id that is not in this version."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = self._locate(ids)
        if (pos < 0).any():
            bad = int(ids[int(np.argmax(pos < 0))])
            raise UnknownIdError(f"id {bad} is not in lake version {self.version}")
        return pos

    def _locate(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` (int64), -1 for ids not in this version, without the whole-lake id
        column (`m2m.lake.idmap.IdRanges`): by arithmetic in a shard whose ids are its whole range (an
        append's shard), through a `ShardIds` built from its id column the first time in any other
        (a bitmap over its range, ~0.19 B per id, kept per snapshot)."""
        with self._lock:
            if self._id_range is None:
                self._id_range = IdRanges.of(self.manifest.shards, self._offsets)
            ranges = self._id_range
        return ranges.locate(ids, self._id_map)

    def _id_map(self, s: int) -> ShardIds:
        with self._lock:
            got = self._id_maps.get(s)
        if got is None:
            entry = self.manifest.shards[s]
            got = ShardIds(self.column(s, "id"), entry.id_min, entry.id_max)
            with self._lock:
                got = self._id_maps.setdefault(s, got)
        return got

    def gather(self, name: str, positions: np.ndarray, stored: bool = False,
               out: np.ndarray | None = None) -> np.ndarray:
        """Column ``name`` at global ``positions`` (vectorised per shard); ``stored``: metadata in its
        stored dtype (`stored_column`), not as a stream reads it; ``out``: an array of
        ``len(positions)`` rows to fill (values cast to its dtype), returned."""
        positions = np.asarray(positions, dtype=np.int64)
        shard_of = np.searchsorted(self._offsets, positions, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        if out is not None and out.shape[:1] != positions.shape:
            raise ConfigError(f"gather: out has {out.shape[0]} rows for {positions.size} positions")
        bounds = np.searchsorted(shard_of[order], np.arange(len(self.manifest.shards) + 1))
        for s in range(len(self.manifest.shards)):
            sel = order[bounds[s]:bounds[s + 1]]
            if len(sel) == 0:
                continue
            col = self.stored_column(s, name) if stored else self.column(s, name)
            vals = col[positions[sel] - self._offsets[s]]
            if out is None:
                out = np.empty((len(positions),) + col.shape[1:], dtype=col.dtype)
            out[sel] = vals
        if out is None:
            col = self.column(0, name) if self.manifest.shards else np.zeros((0, self.dim), np.float32)
            out = np.empty((0,) + col.shape[1:], dtype=col.dtype)
        return out

    def read_all(self, name: str) -> np.ndarray:
        """Column ``name`` over the whole snapshot (a copy)."""
        parts = [self.column(s, name) for s in range(len(self.manifest.shards))]
        if not parts:
            width = (self.dim,) if name == "mu" else ()
            return np.zeros((0,) + width, dtype=self.storage_dtype if name == "mu" else np.float32)
        return np.concatenate(parts)

    def __getstate__(self) -> dict[str, Any]:
        """The pinned version only (a stream's dataset pickles for spawned workers and launchers):
        files read into memory, caches and the lock are rebuilt lazily by the receiver."""
        state = self.__dict__.copy()
        state.update(_batches=OrderedDict(), _batch_bytes={}, _derived={}, _ids=None, _id_maps={}, _lock=None,
                     _verified=set(self._verified))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = ForkSafeLock(reentrant=True)

    def close(self) -> None:
        """Drop the files this snapshot holds in memory; it can still read (it reopens them)."""
        self._batches.clear()
        self._batch_bytes.clear()
        self._derived.clear()
        self._extents.clear()

    # remote lakes (node-local shard cache)
    @property
    def is_remote(self) -> bool:
        """Whether the shards come from an object store through the node cache."""
        return not self.fs.is_local

    @property
    def open_bytes_limit(self) -> int | None:
        """Most bytes of shard files this snapshot (and a stream's reader) keeps open at once: the
        node cache's budget for remote lakes (so evicted files do not stay pinned), None locally."""
        cache = getattr(self.fs, "cache", None)
        return None if cache is None else int(cache.budget)

    def prefetch_shards(self, shards: Sequence[int]) -> int:
        """Start downloading the files of ``shards`` (in this order) into the node cache; a no-op for
        local lakes. Returns how many downloads were queued."""
        cache = getattr(self.fs, "cache", None)
        if cache is None:
            return 0
        files = [(f.path, f.bytes, f.crc32) for s in shards for f in self.manifest.shards[int(s)].files]
        return int(cache.prefetch(files))

    def plan_prefetch(self, shards: Sequence[int]) -> None:
        """The order in which a stream will first read ``shards``: from now on, opening one of them
        queues downloads of the next few in this order (bounded by the cache's ``prefetch_shards``).
        A no-op for local lakes; the latest plan of any stream over this snapshot wins."""
        if self.is_remote:
            order = [int(s) for s in shards]
            self._prefetch_plan = (order, {s: i for i, s in enumerate(order)})
            # cache exists on RemoteFS only; is_remote checked above
            self.prefetch_shards(order[: self.fs.cache.prefetch_shards])  # type: ignore[attr-defined]

    def fetch_stats(self) -> dict[str, Any] | None:
        """This process's node-cache downloads (per file), hits and evictions; None for local lakes."""
        cache = getattr(self.fs, "cache", None)
        return None if cache is None else cache.stats()

    # internals
    def _unknown(self, shard: int, name: str) -> UnknownColumnError:
        if name in self.column_names:  # a lake column this shard lacks: geometry of a later append
            return UnknownColumnError(f"column {name!r} is missing from shard {shard} of version {self.version} "
                                      "(rows appended after estimate_kappa have no neighbours until it runs again)")
        return UnknownColumnError(f"column {name!r} is not in this lake; columns: {list(self.column_names)}")

    def _batch(self, f: FileEntry) -> pa.RecordBatch:
        with self._lock:
            b = self._batches.get(f.path)
            if b is None:
                check = self.verify and f.path not in self._verified
                b = open_shard_file(self.fs, f, verify=check)
                if check:
                    self._verified.add(f.path)
                self._check_footer(f, b)
                self._batches[f.path] = b
                self._batch_bytes[f.path] = f.bytes
                self._trim()
                self._prefetch_after(f.path)
            else:
                self._batches.move_to_end(f.path)
            return b

    def _prefetch_after(self, path: str) -> None:
        """Queue the shards that follow the one holding ``path`` in the current prefetch plan."""
        plan = self._prefetch_plan
        cache = getattr(self.fs, "cache", None)
        if plan is None or cache is None or cache.prefetch_shards <= 0:
            return
        order, where = plan
        shard = self._shard_of_file().get(path)
        at = where.get(shard) if shard is not None else None
        if at is not None:
            self.prefetch_shards(order[at + 1: at + 1 + cache.prefetch_shards])

    def _shard_of_file(self) -> dict[str, int]:
        """File path -> shard index, made on first use (opening a version stays O(segments))."""
        got = self._file_shard
        if got is None:
            got = {f.path: i for i, s in enumerate(self.manifest.shards) for f in s.files}
            self._file_shard = got
        return got

    def _trim(self) -> None:
        """Drop the least recently used files read into memory beyond `open_bytes_limit` (remote lakes)
        or `LOCAL_OPEN_BYTES` (local ones)."""
        limit = self.open_bytes_limit
        if limit is None:
            limit = LOCAL_OPEN_BYTES
        total = sum(self._batch_bytes.values())
        while total > limit and len(self._batches) > 1:
            path, _ = self._batches.popitem(last=False)
            total -= self._batch_bytes.pop(path)

    def _cached(self, shard: int, name: str, make: Callable[[int], np.ndarray]) -> np.ndarray:
        key = (shard, name)
        arr = self._derived.get(key)
        if arr is None:
            arr = make(shard)
            self._derived[key] = arr
        return arr

    def _label_codes(self, shard: int) -> np.ndarray:
        vocab = pa.array(list(self.manifest.label_vocabulary), type=pa.string())
        codes = pc.index_in(self.arrow_column(shard, "label"), value_set=vocab)
        if codes.null_count:  # a label missing from the vocabulary (or a null): never guess a code
            raise CorruptShardError(f"shard {shard} of version {self.version} has {codes.null_count} labels "
                                    f"outside the manifest's label_vocabulary ({len(vocab)} labels)")
        return codes.to_numpy(zero_copy_only=False).astype(np.int64)

    @property
    def _k(self) -> int:
        return int((self.manifest.geometry or {}).get("k", 0))

    def _without_geometry(self, shard: int, name: str) -> bool:
        """True when ``name`` is a geometry sidecar column of this lake that shard ``shard`` lacks
        (written after the last ``estimate_kappa``)."""
        if name not in (NEIGHBORS, NEIGHBOR_COS) or self.manifest.geometry is None:
            return False
        return not any(name in f.columns for f in self.manifest.shards[shard].files)

    def neighbor_positions(self, shard: int) -> np.ndarray:
        """Column ``neighbors`` of shard ``shard`` (neighbour row positions, -1 none), read now and not
        kept (`column` keeps it for the stream's batches)."""
        return self._neighbor_positions(shard)

    def _neighbor_positions(self, shard: int) -> np.ndarray:
        if self._without_geometry(shard, "neighbors"):
            return np.full((self.manifest.shards[shard].rows, self._k), -1, dtype=np.int64)
        nbr_ids = self._file_column(self.manifest.shards[shard].file_for("neighbors"), "neighbors")
        # -1 (none) and ids of rows no longer in this version both read as -1
        return self._locate(np.asarray(nbr_ids, dtype=np.int64).reshape(-1)).reshape(np.shape(nbr_ids))


def _widen(values: np.ndarray, dtype: np.dtype, name: str, shard: int) -> np.ndarray:
    """``values`` (unsigned) as the signed ``dtype``; `CorruptShardError` when a uint64 value does not
    fit (ingest refuses those since this check exists; an older lake may hold one)."""
    if values.dtype == np.uint64 and len(values) and values.max() > np.uint64(np.iinfo(np.int64).max):
        row = int(np.argmax(values > np.uint64(np.iinfo(np.int64).max)))
        raise CorruptShardError(f"column {name!r} row {row} of shard {shard} is {int(values[row])}, beyond int64: "
                                "a stream cannot carry it; read it with to_arrow()")
    return values.astype(dtype)
