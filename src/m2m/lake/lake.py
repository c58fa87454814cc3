"""The lake handle: the user-facing object that writes, reads, verifies and streams one lake."""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import time
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from m2m._forksafe import ForkSafeLock
from m2m._validate import SplatBatch, check_int, check_threads, validate_splats
from m2m.config import M2MConfig, dtype_given
from m2m.errors import (
    AlreadyExistsError,
    CommitConflictError,
    ConfigError,
    DimensionMismatchError,
    InternalError,
    InvalidEmbeddingError,
    LakeClosedError,
    LakeLockedError,
    M2MError,
    UnknownColumnError,
    WriteFailedError,
)
from m2m.lake import summary as lake_stats
from m2m.lake.fs import LakeFS
from m2m.lake.integrity import WriteStamp
from m2m.lake.lock import WriteLock, lock_timeout
from m2m.lake.manifest import (
    DATA_DIR,
    MANIFEST_DIR,
    SEGMENT_DIR,
    Manifest,
    added_shards,
    list_versions,
    manifest_name,
    read_manifest,
    write_manifest,
)
from m2m.lake.reader import Snapshot
from m2m.lake.shard import sync_files
from m2m.lake.tempdirs import remove_with
from m2m.lake.writer import SchemaUpdate, rebase_schema, reconcile_schema, write_splats
from m2m.plugins import implementation

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from m2m.consolidation.groups import ConsolidationReport
    from m2m.lake.compact import CompactionReport
    from m2m.stream.loader import StreamLoader
    from m2m.stream.options import StreamOptions

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


#: The keys of one `Lake.add_splat_chunks` chunk
CHUNK_KEYS = frozenset({"vectors", "labels", "kappa", "alpha", "metadata", "mu_norm", "kappa_nan"})


class Lake:
    """A handle on one lake: append splats, read them, verify, vacuum, and export training streams.

    Readers pin the version they opened; each write is one atomic commit under the lake's write lock
    and advances this handle to the new version. Use as a context manager or call `close()`.
    """

    def __init__(self, fs: LakeFS, config: M2MConfig, manifest: Manifest, temporary_dir: str | None = None) -> None:
        self._fs = fs
        self.config = config
        self._verified: set[str] = set()      # shard files whose CRC32 this handle has checked
        self._checked: set[tuple[object, ...]] = set()  # files cross-checked against their manifest entry
        self._snapshot = self._open(manifest)
        self._temporary_dir = temporary_dir
        # a temporary lake's folder goes when the last user of its files (this handle, its snapshots,
        # a loader) is collected or the interpreter exits, if close() did not remove it before
        self._remove_temporary = None if temporary_dir is None else remove_with(fs, temporary_dir)
        self._closed = False
        # held by a commit and by close(): close() from another thread waits for a commit in flight (it
        # removed a temporary lake's folder under it, the commit's manifest landed after, the folder stayed)
        self._commits = ForkSafeLock(reentrant=True)
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> str:
        """The lake's location: a local folder or the fsspec URL it was opened with."""
        return getattr(self._fs, "url", self._fs.root)

    @property
    def manifest(self) -> Manifest:
        """The manifest of the pinned version (shards, rows, dim, dtype, stats, label vocabulary)."""
        return self._snapshot.manifest

    @property
    def snapshot(self) -> Snapshot:
        """The pinned version this handle reads."""
        self._check_open()
        return self._snapshot

    @property
    def dim(self) -> int:
        """The vector dimension (``latent_dim``) of every row."""
        return self.manifest.dim

    @property
    def version(self) -> int:
        """The version this handle is pinned to (moves with each commit and `refresh`)."""
        return self.manifest.version

    def __len__(self) -> int:
        return self.manifest.rows

    def __repr__(self) -> str:
        return f"Lake(path={self.path!r}, rows={len(self)}, dim={self.dim}, version={self.version})"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Lake":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release memory maps and caches; delete the lake if it was temporary."""
        with self._commits:
            if self._closed:
                return
            self._closed = True
        self._snapshot.close()
        self._clear_cache()
        close_fs = getattr(self._fs, "close", None)
        if close_fs is not None:  # a remote lake's shard cache: stop prefetching, remove it if private
            close_fs()
        if self._remove_temporary is not None:
            self._remove_temporary()

    def _check_open(self) -> None:
        if self._closed:
            raise LakeClosedError(f"lake {self.path} is closed")

    def refresh(self) -> int:
        """Move this handle to the latest committed version; returns it."""
        self._check_open()
        latest = read_manifest(self._fs)
        if latest.version != self.version:
            self._set_manifest(latest)
        return self.version

    def checkout(self, version: int) -> Snapshot:
        """A read-only snapshot of an older (or newer) committed version."""
        return self._open(read_manifest(self._fs, check_int(version, "version", 0)))

    def versions(self) -> list[int]:
        """Committed versions still on disk."""
        return list_versions(self._fs)

    def _set_manifest(self, manifest: Manifest) -> None:
        self._snapshot.close()
        self._snapshot = self._open(manifest)
        self._clear_cache()

    def _clear_cache(self) -> None:
        # the random-access reader's open files go now, not when a collection finds the handle (close()
        # left up to 128 descriptors open per handle: a loop opening lakes ran out of them, 2026-12-08)
        reader = self._cache.get("row_reader")
        if reader is not None:
            reader.close()
        self._cache.clear()

    def _open(self, manifest: Manifest) -> Snapshot:
        """A snapshot of ``manifest`` that checks each file's CRC32 once per handle (``verify_reads``)."""
        return Snapshot(self._fs, manifest, verify=self.config.verify_reads, verified=self._verified,
                        checked=self._checked)

    # ------------------------------------------------------------------ commits
    def commit(self, operation: str, build: Callable[[Manifest], Manifest]) -> Manifest:
        """Run one atomic commit: ``build(latest) -> next manifest``.

        Local lakes: under the write lock. Object stores: optimistic, with a conditional put of the
        manifest; on a conflict ``build`` runs again on the new head (`m2m.lake.commit`).
        Files that ``build`` writes but that the commit does not publish (it raised) are removed.
        """
        with self._commits:
            self._check_open()
            return self._commit(operation, build)

    def _commit(self, operation: str, build: Callable[[Manifest], Manifest]) -> Manifest:
        if not self._fs.is_local:
            from m2m.lake.commit import HEAVY_ATTEMPTS, commit_remote

            new = commit_remote(self._fs, operation, build, attempts=HEAVY_ATTEMPTS)
            self._set_manifest(new)
            logger.info("committed version %d (%s): %d rows", new.version, operation, new.rows)
            return new
        with write_lock(self._fs):
            base = read_manifest(self._fs)
            mark = self._fs.mark()
            started = time.time()
            committed = False
            try:
                new = build(base)
                if new.version != base.version + 1:
                    raise InternalError(f"commit {operation!r} built version {new.version} on {base.version}")
                sync_files(self._fs, [f.path for s in added_shards(base, new) for f in s.files])
                new = write_manifest(self._fs, new)
                committed = True
            finally:  # also on KeyboardInterrupt: the files of a commit that was not published go
                if not committed and not self._fs.exists(manifest_name(base.version + 1)):
                    for rel in self._fs.written_since(mark):
                        if rel.startswith((f"{DATA_DIR}/", f"{SEGMENT_DIR}/")):
                            self._fs.remove(rel)
                    _remove_unreferenced_since(self._fs, base, started)
        self._set_manifest(new)
        logger.info("committed version %d (%s): %d rows", new.version, operation, new.rows)
        return new

    def add_splats(self, vectors: Any, labels: npt.ArrayLike | None = None,
                   kappa: npt.ArrayLike | None = None, alpha: npt.ArrayLike | None = None,
                   metadata: Mapping[str, Any] | Sequence[str] | bool | None = None,
                   progress: Progress | None = None) -> np.ndarray:
        """Append splats atomically; returns their new unique, stable int64 ids.

        ``vectors`` is ``[n, latent_dim]`` or ``[latent_dim]`` (numpy, torch on any device, or lists);
        rows are normalised to the unit sphere. Invalid input raises a ``ValueError`` naming the problem
        and the first offending row before anything is written. Tabular data (a pyarrow Table or
        RecordBatchReader, a Polars DataFrame, a Hugging Face dataset) goes to `add_table`, with
        ``labels`` a column name and ``metadata`` a list of column names. With
        ``M2MConfig.auto_consolidate=True`` a supercritical lake is consolidated right after the append
        (a second commit): rows merged there keep their group's smallest id, so some of the ids returned
        may be gone from ``lake.version`` (they are in ``lake.version - 1``).

        Example: ``ids = lake.add_splats(np.random.randn(100, 64), labels=["cat", "dog"] * 50)``.
        """
        self._check_open()
        from m2m.lake.ingest import is_batch_iterator, is_tabular

        if is_tabular(vectors) or is_batch_iterator(vectors):
            if kappa is not None or alpha is not None or not (labels is None or isinstance(labels, str)):
                raise InvalidEmbeddingError("with a table as input, labels is a column name and metadata a list "
                                            "of column names (or True for every other column); kappa/alpha "
                                            "do not apply")
            all_columns = metadata is True
            if isinstance(metadata, Mapping) or isinstance(metadata, str):
                raise InvalidEmbeddingError("with a table as input, metadata is a list of column names (or True "
                                            f"for every other column), got {metadata!r}")
            meta = () if metadata is None or isinstance(metadata, bool) else tuple(metadata)
            return self.add_table(vectors, label_column=labels, meta_columns=meta, all_columns=all_columns,
                                  progress=progress)
        if not (metadata is None or isinstance(metadata, Mapping)):
            raise InvalidEmbeddingError("metadata is a dict of columns {name: values} (a list of names or True "
                                        f"applies to a table as input), got {type(metadata).__name__}")
        batch = validate_splats(vectors, labels, kappa, alpha, metadata, self.dim)
        return self._append(lambda: iter([batch]), progress)

    def add_table(self, data: Any, column: str | None = None, label_column: str | None = None,
                  meta_columns: Iterable[str] = (), all_columns: bool = False, chunk_bytes: int | None = None,
                  progress: Progress | None = None) -> np.ndarray:
        """Append Arrow data as one atomic commit, read once in chunks of about ``chunk_bytes``.

        ``data``: a `pyarrow.Table`, `RecordBatch` or `RecordBatchReader`, an iterable of record batches,
        anything exporting ``__arrow_c_stream__`` (a Polars DataFrame, ...) or a Hugging Face
        `datasets.Dataset`. ``column``: the vector column (default: the first list column);
        ``label_column``; ``meta_columns`` kept as metadata, or ``all_columns`` for every other column.
        `add_splats` given such data calls this (``labels`` = column name, ``metadata`` = column names).
        """
        from m2m.lake.ingest import CHUNK_BYTES, Columns, table_chunks

        if isinstance(meta_columns, str):
            meta_columns = (meta_columns,)
        cols = Columns(column, label_column, tuple(meta_columns), bool(all_columns))
        chunks = table_chunks(data, cols, CHUNK_BYTES if chunk_bytes is None else check_int(chunk_bytes, "chunk_bytes"))
        return self.add_splat_chunks(chunks, progress)

    def add_splat_chunks(self, chunks: Callable[[], Iterable[Mapping[str, Any]]],
                         progress: Progress | None = None) -> np.ndarray:
        """Append a large input as one atomic commit, chunk by chunk, in one pass over the input.

        ``chunks()`` returns an iterable of dicts with the keys of `add_splats` (``vectors``,
        ``labels``, ``kappa``, ``alpha``, ``metadata``; ``kappa_nan=True``: NaN kappa is "not
        estimated"; ``mu_norm``: ``vectors`` are an m2m export's unit ``mu`` and these its norms,
        `m2m.lake.ingest.export_rows`). Each chunk is validated and then written into
        shard files that belong to no version yet; the manifest is published only after the last chunk
        was validated, so an invalid chunk anywhere leaves the lake exactly as before (the files
        written so far are removed). ``chunks`` is called once on a local lake; on an object store twice
        (a validation pass counts the rows, whose ids are reserved before any shard is written).
        """
        self._check_open()

        def validated() -> Iterable[SplatBatch]:
            start = 0
            for k, chunk in enumerate(chunks()):
                # (a chunk that is no dict raised numpy's IndexError, one without "vectors" a KeyError, and a
                # misspelled key such as "label" was ignored)
                if not isinstance(chunk, Mapping) or "vectors" not in chunk:
                    raise InvalidEmbeddingError(f"add_splat_chunks: chunk {k} is {type(chunk).__name__}"
                                                f"{' without a vectors entry' if isinstance(chunk, Mapping) else ''}"
                                                f"; each chunk is a dict with keys {sorted(CHUNK_KEYS)}")
                unknown = sorted(set(chunk) - CHUNK_KEYS)
                if unknown:
                    raise InvalidEmbeddingError(f"add_splat_chunks: chunk {k} has unknown key(s) {unknown}; the keys "
                                                f"are {sorted(CHUNK_KEYS)}")
                if np.ndim(chunk["vectors"]) >= 1 and len(chunk["vectors"]) == 0:
                    continue   # an empty chunk adds nothing (the Arrow path skips empty batches too)
                vectors, norms = chunk["vectors"], None
                if chunk.get("mu_norm") is not None:
                    from m2m.lake.ingest import export_rows

                    vectors, norms = export_rows(vectors, chunk["mu_norm"], self.config.storage_dtype)
                b = validate_splats(vectors, chunk.get("labels"), chunk.get("kappa"), chunk.get("alpha"),
                                    chunk.get("metadata"), self.dim, start=start,
                                    kappa_nan=bool(chunk.get("kappa_nan", False)))
                if norms is not None:
                    b = dataclasses.replace(b, norms=norms)
                start += b.rows
                yield b
            if start == 0:
                raise InvalidEmbeddingError("add_splat_chunks: every chunk is empty (0 rows)")

        return self._append(validated, progress)

    def _append(self, batches: Callable[[], Iterable[SplatBatch]], progress: Progress | None) -> np.ndarray:
        cfg = self.config
        if not self._fs.is_local:
            # many writers on an object store: ids are reserved before the shards are written, so the
            # rows are counted in a validation pass first and the input is read twice
            assumed = read_manifest(self._fs)
            planned = SchemaUpdate.of(assumed)
            rows = 0
            summary: dict[str, Any] = {}
            for b in batches():
                planned = reconcile_schema(planned, b)
                rows += b.rows
                summary = lake_stats.merge(summary, lake_stats.summarize(b.kappa, b.alpha))
            if rows == 0:
                raise InvalidEmbeddingError("nothing to add: the input has no rows")
            from m2m.lake.commit import append_remote

            # ids are reserved: append_remote gives the first shard's prev_id (None when its place is
            # only known at commit); labels added by this append may move behind a concurrent
            # writer's, so only the head's are stamped
            stamp = WriteStamp(assumed.lake_id, None, len(assumed.label_vocabulary), append=True)
            new, ids = append_remote(
                self._fs, lambda first, prev: write_splats(self._fs, batches(), first, assumed.dim, assumed.dtype,
                                                           cfg.shard_bytes, planned, progress,
                                                           dataclasses.replace(stamp, prev_id=prev)),
                lambda base: rebase_schema(planned, assumed, base), rows, summary)
            self._set_manifest(new)
            logger.info("committed version %d (append): %d rows", new.version, new.rows)
            if cfg.auto_consolidate:
                self._auto_consolidate()
            self._auto_compact()
            return ids
        holder: dict[str, int] = {}

        def build(base: Manifest) -> Manifest:
            # One pass: each batch is checked against the schema so far, then written; nothing is
            # visible until the manifest below is published (commit removes the files on any error).
            state: dict[str, Any] = {"schema": SchemaUpdate.of(base), "rows": 0, "summary": {}}

            def checked() -> Iterable[SplatBatch]:
                for b in batches():
                    state["schema"] = reconcile_schema(state["schema"], b)
                    state["rows"] += b.rows
                    state["summary"] = lake_stats.merge(state["summary"], lake_stats.summarize(b.kappa, b.alpha))
                    yield b

            stamp = WriteStamp(base.lake_id, base.shards[-1].id_max if base.shards else -1, append=True)
            shards = write_splats(self._fs, checked(), base.next_id, base.dim, base.dtype, cfg.shard_bytes,
                                  lambda: state["schema"], progress, stamp)
            rows, schema = state["rows"], state["schema"]
            if rows == 0:
                raise InvalidEmbeddingError("nothing to add: the input has no rows")
            holder["rows"] = rows
            return base.next(shards=base.shards + tuple(shards), next_id=base.next_id + rows,
                             label_type=schema.label_type, label_vocabulary=schema.label_vocabulary,
                             metadata=schema.metadata, stats=lake_stats.merge(base.stats, state["summary"]),
                             operation={"type": "append", "rows": rows})

        new = self.commit("append", build)
        rows = holder["rows"]
        ids = np.arange(new.next_id - rows, new.next_id, dtype=np.int64)
        if cfg.auto_consolidate:
            self._auto_consolidate()
        self._auto_compact()
        return ids

    def _auto_consolidate(self) -> None:
        state = self.criticality()
        if state["state"] == "supercritical":
            logger.info("lake is supercritical (redundancy %.3f): consolidating", state["redundancy"])
            self.consolidate(self.config.consolidate_similarity)

    def compact(self, target_bytes: int | None = None, progress: Progress | None = None) -> CompactionReport:
        """Merge runs of small shards (and their sidecars) into shards of about ``target_bytes``
        (default ``config.shard_bytes``) in one atomic commit; ids, row order and values are kept.

        The merged files are written without holding the lock; the commit then rebases on the head
        and replaces only runs no concurrent commit touched (`m2m.lake.compact`). Old files stay for
        readers pinned to older versions until `vacuum`. Returns a `CompactionReport`.
        """
        from m2m.lake.compact import compact, publish_local, publish_remote

        self._check_open()
        target = self.config.shard_bytes if target_bytes is None else target_bytes
        fs = self._fs

        def publish(build: Callable[[Manifest], Manifest]) -> Manifest:
            new = publish_local(fs, build) if fs.is_local else publish_remote(fs, build)
            self._set_manifest(new)
            logger.info("committed version %d (compact): %d shards", new.version, len(new.shards))
            return new

        return compact(fs, publish, target, verify=True, progress=progress)

    def _auto_compact(self) -> None:
        """``config.auto_compact`` > 0: compact once that many small shards could be merged. The append
        before it is committed either way, so a compaction that fails is logged, not raised."""
        from m2m.lake.compact import mergeable_shards

        n = self.config.auto_compact
        if n <= 0 or mergeable_shards(self.manifest, self.config.shard_bytes) < n:
            return
        try:
            report = self.compact()
            logger.info("auto-compaction: %d shards -> %d", report.shards_before, report.shards_after)
        except (CommitConflictError, LakeLockedError, OSError) as exc:
            logger.warning("auto-compaction of %s skipped (the append is committed): %s", self.path, exc)

    # ------------------------------------------------------------------ random access
    def __getitem__(self, key: int | slice | npt.ArrayLike) -> dict[str, Any]:
        """Rows by position in the pinned version, bit-exact as stored (``mu`` in the storage dtype),
        as ``lake.splats()``'s columns: ``lake[i]`` -> one row (``mu`` [d], scalars); ``lake[i:j]``
        (step >= 1), ``lake[[i, j, ...]]`` or ``lake[mask]`` (a boolean mask with one entry per row) ->
        columns of those rows (``mu`` [n, d]). Only the needed
        rows are read (`m2m.lake.access`). Positions are 0 <= i < len(lake); anything else raises
        `PositionError` (an IndexError).

        Example: ``lake[0]["mu"]``, ``lake[10:20]["id"]``."""
        from m2m.lake.access import reader_of

        self._check_open()
        return reader_of(self).getitem(key).to_dict()

    def take(self, ids: npt.ArrayLike, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The rows with these ids (in this order, repeats allowed) as ``lake.splats()``'s columns,
        bit-exact as stored; ``columns`` keeps only those (`UnknownColumnError` names one that is not
        there). `UnknownIdError` names the first id not in the pinned version. Reads only the shards
        holding them.

        Example: ``lake.take([3, 1], columns=("id", "mu"))``."""
        from m2m.lake.access import reader_of

        self._check_open()
        if isinstance(columns, str):
            raise UnknownColumnError(f"take(columns=...) takes a sequence of names, not the string {columns!r} "
                                     f"(write columns=({columns!r},))")
        out = reader_of(self).take(ids).to_dict()
        if columns is None:
            return out
        missing = [c for c in columns if c not in out]
        if missing:
            raise UnknownColumnError(f"take(columns=...): {missing[0]!r} is not a column; columns: {sorted(out)}")
        return {c: out[c] for c in columns}

    # ------------------------------------------------------------------ reading
    def splats(self, ids: npt.ArrayLike | None = None) -> dict[str, np.ndarray]:
        """Columns ``id``, ``mu`` [n, d] (float32), ``kappa``, ``alpha``, ``label`` (if any) and metadata."""
        snap = self.snapshot
        if ids is None:
            positions = np.arange(snap.num_rows, dtype=np.int64)
        else:
            from m2m.lake.access import checked_ids

            positions = snap.positions(checked_ids(ids, self.manifest.version))
        out: dict[str, np.ndarray] = {}
        for name in snap.column_names:
            if name in ("neighbors", "neighbor_cos"):
                continue
            if not self.manifest.shards:  # (no shard to read a dtype from: every column was float32 [0, d])
                from m2m.lake.access import empty_dtype

                dt = np.float32 if name == "mu" else object if name == "label" and self.manifest.label_type == \
                    "string" else empty_dtype(self.manifest, name)
                out[name] = np.empty((0, self.dim) if name == "mu" else (0,), dtype=dt)
                continue
            if name == "label" and self.manifest.label_type == "string":
                codes = snap.gather("label", positions)
                vocab = np.asarray(self.manifest.label_vocabulary, dtype=object)
                out["label"] = vocab[codes]
                continue
            values = snap.gather(name, positions, stored=True)
            out[name] = values.astype(np.float32) if name == "mu" else values
        return out

    @property
    def label_vocabulary(self) -> tuple[str, ...]:
        """String labels in code order: a streamed ``label`` code ``c`` stands for ``label_vocabulary[c]``
        (empty for int labels or none)."""
        m = self.manifest
        return tuple(m.label_vocabulary) if m.label_type == "string" else ()

    def decode_labels(self, codes: npt.ArrayLike) -> np.ndarray:
        """The string labels of streamed ``label`` codes (a tensor, array or list of ints), as an object
        array; `ConfigError` when the lake's labels are not strings or a code is out of range.

        Example: ``batch = next(iter(lake.export_to_dataloader(columns=("embedding", "label"))))``, then
        ``lake.decode_labels(batch["label"])`` -> ``array(['dog', 'cat', ...], dtype=object)``."""
        from m2m._validate import decode_codes

        m = self.manifest
        if m.label_type != "string":
            raise ConfigError(f"lake {self.path} has {m.label_type or 'no'} labels; only string labels are "
                              "streamed as codes")
        return decode_codes(m.label_vocabulary, codes)

    def to_arrow(self, version: int | None = None, columns: Sequence[str] | None = None, stream: bool = False,
                 float32: bool = False, original: bool = False) -> pa.Table | pa.RecordBatchReader:
        """One snapshot as Arrow data, sidecars joined: ``id``, ``mu`` (fixed_size_list[d]), ``kappa``,
        ``alpha``, ``label``, ``neighbors``/``neighbor_cos`` (neighbour ids and cosines, once kappa was
        estimated) and the metadata columns; one record batch per shard.

        ``version``: None = this handle's pinned version. ``columns``: a subset of names (None: all).
        ``stream=False`` -> a `pyarrow.Table` (over shard files read whole into memory);
        ``stream=True`` -> a `pyarrow.RecordBatchReader` that opens one shard at a time (bounded memory;
        iterate it once). ``float32``: float16 ``mu`` and float16 metadata as float32 (for tools without float16, e.g. DuckDB).
        ``mu_norm`` (float64) is each row's norm as given; ``original=True``: ``mu`` is each row's vector
        as given, ``mu * mu_norm`` in float32 (within 1 ulp of float32 input; docs/format.md, "Vectors").
        ``pa.table(lake)`` / ``polars.DataFrame(lake)`` read the pinned version through ``__arrow_c_stream__``.

        Example: ``t = lake.to_arrow(float32=True)``, then ``duckdb.sql("select label, count(*) from t
        group by label")``; ``for batch in lake.to_arrow(stream=True): ...`` for bounded memory.
        """
        from m2m.lake.export import lake_file_opener, snapshot_batches

        self._check_open()
        manifest = self.manifest if version is None else read_manifest(self._fs, check_int(version, "version", 0))
        opener = lake_file_opener(self._fs, manifest, self.config.verify_reads, self._verified, self._checked)
        reader = snapshot_batches(manifest, opener, columns=columns, float32=float32, original=original)
        return reader if stream else reader.read_all()

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        """The Arrow PyCapsule stream of the pinned version (so ``pa.table(lake)`` works)."""
        return self.to_arrow(stream=True).__arrow_c_stream__(requested_schema)

    def info(self) -> dict[str, Any]:
        """Rows, dim, dtype, bytes, shards, version, kappa/alpha summary, labels and columns."""
        m = self.manifest
        d = lake_stats.describe(m.stats, m.rows)
        return {
            "path": self.path, "rows": m.rows, "dim": m.dim, "dtype": m.dtype, "bytes": m.bytes,
            "shards": len(m.shards), "version": m.version, "versions": len(self.versions()),
            "kappa": d["kappa"], "alpha": d["alpha"],
            "labels": None if m.label_type is None else {
                "type": m.label_type, "classes": len(m.label_vocabulary) if m.label_type == "string" else None},
            "metadata": dict(m.metadata), "geometry": m.geometry, "last_operation": m.operation,
        }

    # ------------------------------------------------------------------ geometry, search, SOC, streams
    def estimate_kappa(self, progress: Progress | None = None, threads: int | None = None,
                       engine: str = "local") -> np.ndarray:
        """(Re)compute every splat's kappa from its ``knn_k`` nearest neighbours (a new version).

        Stores the neighbour ids too (Langevin uses them). User-provided kappa values are kept.
        Returns the kappa of every splat in position order. ``threads``: FAISS/torch threads of the
        kNN (None: every core this process may use, as FAISS does by default, docs/tuning.md; pass 1
        when other work needs the cores).
        ``engine``: "local" (this process) or "ray" (IVF list searches as Ray tasks on the connected
        Ray cluster, `m2m.ray.geometry`; ``threads`` then applies to the driver's share only).
        """
        from m2m.index.runtime import usable_cores
        from m2m.lake.neighbourhood import estimate

        check_engine(engine)
        if len(self) == 0:
            return np.zeros(0, dtype=np.float32)
        cfg = self.config
        n_threads = usable_cores() if threads is None else check_threads(threads)
        if engine == "ray":
            ray_estimate = implementation("ray.estimate")
            self.commit("estimate_kappa", lambda base: ray_estimate(self._open(base), cfg.knn_k, cfg.seed, progress))
            return self.snapshot.read_all("kappa")
        self.commit("estimate_kappa",
                    lambda base: estimate(self._open(base), cfg.knn_k, cfg.seed, progress, n_threads))
        return self.snapshot.read_all("kappa")

    def search(self, queries: npt.ArrayLike, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Cosine top-``k`` of each query: ``(scores [q, k] float32, ids [q, k] int64)`` (-1 past the end)."""
        from m2m.index.search import SearchIndex

        key = "search"  # the cache is cleared whenever this handle moves to another version
        index = self._cache.get(key)
        if index is None:
            snap = self.snapshot
            index = SearchIndex(snap.read_all("mu"), snap.ids(), seed=self.config.seed)
            self._cache[key] = index
        return index.search(queries, k)

    def consolidate(self, similarity: float | None = None, progress: Progress | None = None,
                    engine: str = "local") -> ConsolidationReport:
        """Merge near-duplicate splats (cosine >= ``similarity``, same label) into heavier splats.

        ``mu`` = normalised alpha-weighted mean, ``alpha`` = sum of the group's alphas (conserved
        exactly), kappa re-estimated. One atomic commit; returns a report with ``rows_before``,
        ``rows_after``, ``groups_merged``. ``engine``: "local" or "ray" (duplicate search and the
        kNN of the new version as Ray tasks, `m2m.ray.geometry`; the merge itself runs here).
        """
        from m2m.lake.consolidate import consolidate_manifest

        check_engine(engine)

        sim = self._similarity(similarity)
        if not 0.0 < sim <= 1.0:
            raise ConfigError(f"similarity must be in (0, 1], got {similarity!r}")
        holder: dict[str, ConsolidationReport] = {}

        def build(base: Manifest) -> Manifest:
            new, report = consolidate_manifest(self._open(base), sim, self.config, progress, engine=engine)
            holder["report"] = report
            return new

        self.commit("consolidate", build)
        return holder["report"]

    def _similarity(self, similarity: Any) -> float:
        """``similarity`` as a float (the config's when None); `ConfigError` naming anything not a number."""
        if similarity is None:
            return float(self.config.consolidate_similarity)
        if isinstance(similarity, bool) or not isinstance(similarity, numbers.Real):
            raise ConfigError(f"similarity must be a number in (0, 1], got {similarity!r}")
        return float(similarity)

    def criticality(self, similarity: float | None = None, sample: int = 2000,
                    exact_max_rows: int = 200_000) -> dict[str, Any]:
        """Estimated ``redundancy`` (fraction consolidation would remove) and ``state`` vs ``soc_threshold``.

        Up to ``exact_max_rows`` splats the duplicate groups are computed exactly (as `consolidate`
        would), so redundancy = 1 - groups / rows; above, it is estimated from ``sample`` rows as
        mean(1 - 1/(1 + duplicates of the row)), exact when groups are cliques and a lower bound when
        they chain (``method`` says which was used).
        """
        from m2m.consolidation.criticality import criticality_state, estimate_redundancy
        from m2m.consolidation.groups import find_duplicate_groups
        from m2m.index.rows import rows_f32

        sim = self._similarity(similarity)
        sample, exact_max_rows = check_int(sample, "sample"), check_int(exact_max_rows, "exact_max_rows", 0)
        base = {"threshold": self.config.soc_threshold, "similarity": sim, "rows": len(self)}
        if len(self) == 0:
            return {"redundancy": 0.0, "state": "subcritical", "method": "empty", **base}
        snap = self.snapshot
        labels = snap.read_all("label") if self.manifest.label_type is not None else None
        mu = rows_f32(snap.read_all("mu"), slice(None))   # float16 rows renormalised, as the kNN reads them
        if len(self) <= exact_max_rows:
            groups = find_duplicate_groups(mu, labels, sim, seed=self.config.seed)
            redundancy = 1.0 - len(np.unique(groups)) / len(self)
            method = "exact"
        else:
            redundancy = estimate_redundancy(mu, labels, sim, sample=sample, seed=self.config.seed)
            method = f"sampled ({sample} rows)"
        return {"redundancy": float(redundancy), "state": criticality_state(redundancy, self.config.soc_threshold),
                "method": method, **base}

    def export_to_dataloader(self, batch_size: int | None = None, shuffle: bool | None = None,
                             drop_last: bool | None = None, generate_samples: bool | str | None = None,
                             importance_sampling: bool | str | None = None, columns: Sequence[str] | None = None,
                             num_workers: int | None = None, rank: int | None = None, world_size: int | None = None,
                             seed: int | None = None, epoch: int | None = None, *, options: StreamOptions | None = None,
                             **overrides: Any) -> StreamLoader:
        """A `torch.utils.data.DataLoader` streaming this snapshot's splats as whole batches on ``config.device``.

        Every knob is a field of `m2m.StreamOptions`: pass the object as ``options=`` and/or any field as
        a keyword (a keyword overrides the object; a keyword left at None keeps the object's value).
        Defaults: ``batch_size=256``, shuffled, ``device``/``seed``/budgets from this lake's config.
        ``generate_samples``: False | True/"langevin" (each row replaced by the end of a short Langevin
        chain started at it; at d >= 64 it stays in the row's own vMF) | "vmf" (an exact draw from the
        row's own vMF) | "mixture" (an exact draw from the mixture of the row's and its same-label
        neighbours' splats). ``importance_sampling``:
        False | True/"kappa" | "alpha" | "loss" | a numeric metadata column; batches then carry an
        unbiased ``weight``. ``columns``: None -> float tensors [B, d]; a tuple of names -> dicts.
        Kappa is computed in memory first when a mode needs it and some splat lacks it (never written).
        Returns a `m2m.stream.loader.StreamLoader` (a DataLoader with ``state_dict()`` for resume).

        Example:

            dl = lake.export_to_dataloader(batch_size=256, columns=("embedding", "label"), num_workers=2)
            for batch in dl:
                x, y = batch["embedding"], batch["label"]
        """
        self._check_open()
        named = {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last,
                 "generate_samples": generate_samples, "importance_sampling": importance_sampling,
                 "columns": columns, "num_workers": num_workers, "rank": rank, "world_size": world_size,
                 "seed": seed, "epoch": epoch}
        given = {k: v for k, v in named.items() if v is not None}
        return implementation("stream.export")(self, options, **given, **overrides)

    # ------------------------------------------------------------------ maintenance
    def verify(self, progress: Progress | None = None) -> list[str]:
        """Check every file of the pinned version; returns the problems found (empty: all good).

        Each file's size and CRC32, and its Arrow footer and ids against the manifest: row count,
        column types (dim, dtype), first/last id and strictly ascending ids (`m2m.lake.integrity`).
        The manifest's own checksum and id layout were checked when it was read; a format-3 lake's
        segments (read on first use) are all read and checked first: a damaged one is the problem
        reported.
        """
        from m2m.errors import CorruptShardError
        from m2m.lake.integrity import check_stats, verify_files
        from m2m.lake.manifest import load_all

        try:
            load_all(self.manifest.shards)
        except CorruptShardError as exc:
            return [str(exc)]
        problems = verify_files(self._fs, self.manifest, progress)
        if not problems and self.manifest.rows:
            snap = self.snapshot
            stats_problem = check_stats(self.manifest, snap.read_all("kappa"), snap.read_main("alpha"))
            if stats_problem is not None:
                problems.append(stats_problem)
        return problems

    def vacuum(self, keep: int = 1, min_age_s: float | None = None,
               allow_symlinked_dirs: bool = False) -> dict[str, int]:
        """Delete all but the last ``keep`` versions and every m2m file they do not reference.

        Also removes the files of interrupted commits. Readers pinned to a deleted version lose it.
        Only regular files named as m2m names them are deleted, never through a symlink; a
        symlinked ``_data``/``_manifests`` folder is refused unless ``allow_symlinked_dirs``
        (`m2m.lake.vacuum`). On an object store other writers may be mid-commit (their shards are
        not referenced yet), so only unreferenced objects older than ``min_age_s`` go (default:
        3600 s remote, 0 local: a local commit holds the lock, but a compaction or a Ray write in
        another process writes its files before it takes the lock to publish them).
        """
        keep = check_int(keep, "keep")
        if min_age_s is not None and (isinstance(min_age_s, bool) or not isinstance(min_age_s, numbers.Real)
                                      or not math.isfinite(min_age_s) or min_age_s < 0):
            raise ConfigError(f"min_age_s must be a finite number of seconds >= 0 or None, got {min_age_s!r}")
        self._check_open()
        if not self._fs.is_local:
            from m2m.lake.commit import vacuum_remote

            return vacuum_remote(self._fs, keep, 3600.0 if min_age_s is None else float(min_age_s))
        from m2m.lake.vacuum import vacuum_local

        with write_lock(self._fs):
            return vacuum_local(self._fs, keep, allow_symlinked_dirs, 0.0 if min_age_s is None else float(min_age_s))


ENGINES = ("local", "ray")


def check_engine(engine: Any) -> None:
    """`ConfigError` naming ``engine`` unless it is one of ``ENGINES``."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")


def _remove_unreferenced_since(fs: LakeFS, base: Manifest, started: float) -> None:
    """After a failed local commit: remove the data files no version references that appeared since
    it started, also those other processes wrote for it (Ray tasks of `write_lake`). A listing of
    ``_data/``, so only on this failure path (a commit's cost must not grow with the lake)."""
    from m2m.lake.vacuum import is_data_name

    referenced = {f.path for f in base.files()}
    for name in fs.listdir(DATA_DIR):
        rel = f"{DATA_DIR}/{name}"
        if not is_data_name(name) or rel in referenced:
            continue
        try:  # file system timestamps are coarser than time.time(): 50 ms of slack
            appeared = os.stat(fs.local_path(rel)).st_mtime >= started - 0.05
        except OSError:
            continue
        if appeared:
            fs.remove(rel)


def write_lock(fs: LakeFS) -> WriteLock:
    """The lake's write lock (waits ``$M2M_LOCK_TIMEOUT`` seconds, default 0, for another writer)."""
    path = os.path.join(fs.root, "_lock") if fs.is_local else None
    return WriteLock(path, timeout=lock_timeout())


def create_empty(fs: LakeFS, config: M2MConfig) -> Manifest:
    """Initialise an empty lake (version 0) at ``fs``."""
    try:
        fs.makedirs(MANIFEST_DIR)
        fs.makedirs(DATA_DIR)
    except (NotADirectoryError, FileExistsError):  # a file where the lake (or one of its folders) would go
        raise AlreadyExistsError(f"cannot create a lake at {fs.root}: a file is in the way "
                                 f"(the path, or its {MANIFEST_DIR} or {DATA_DIR})") from None
    except OSError as exc:  # a folder that cannot be made there (read-only, /proc, no permission)
        if isinstance(exc, M2MError):
            raise
        raise WriteFailedError(f"cannot create a lake at {fs.root}: {exc.strerror or exc}") from exc
    manifest = Manifest(version=0, dim=config.latent_dim, dtype=config.storage_dtype, next_id=0, shards=(),
                        created=time.time(), operation={"type": "create"}, lake_id=uuid.uuid4().hex)
    with write_lock(fs):
        if list_versions(fs):
            return read_manifest(fs)
        try:
            manifest = write_manifest(fs, manifest)
        except CommitConflictError:  # another process created the lake at the same moment
            return read_manifest(fs)
    return manifest


def check_compatible(manifest: Manifest, config: M2MConfig, where: str) -> None:
    """A clear ValueError when a config does not match an existing lake."""
    if manifest.dim != config.latent_dim:
        # (an empty lake is what a first ingest into an object store leaves when it fails: its retry with
        # the corrected data was refused without a hint)
        empty = (f" (the lake holds no rows: a first write that failed leaves it; remove {where} to start "
                 "again at another latent_dim)") if manifest.rows == 0 and manifest.version == 0 else ""
        raise DimensionMismatchError(
            f"lake {where} has latent_dim {manifest.dim}, the config asks for {config.latent_dim}{empty}")
    if manifest.dtype != config.storage_dtype and dtype_given(config):
        raise DimensionMismatchError(
            f"lake {where} stores {manifest.dtype}, the config asks for storage_dtype={config.storage_dtype!r}")
