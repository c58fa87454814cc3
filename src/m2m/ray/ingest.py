"""`write_lake`: a Ray Dataset into a lake, shards written in parallel by Ray tasks, one commit.

How it runs:

1. The dataset's needed columns are materialised in Ray's object store in dataset order (Ray
   spills blocks to disk when they exceed its object store). This is what gives every block its
   row count -- and so its id range -- before any shard is written: ids are assigned
   deterministically from block order and counts, ``next_id`` of the lake onward, with no renumbering.
2. Under the lake's write lock (`Lake.commit`), one Ray task per run of consecutive blocks of about
   one shard validates its rows (`m2m._validate.validate_splats`, error messages give the row number
   in the dataset), checks them against the lake's schema (`m2m.lake.writer.reconcile_schema`) and
   writes shard files with the lake's own writer (`m2m.lake.writer.write_splats`: normalisation,
   storage dtype, checksums), returning their manifest entries.
3. The driver merges the tasks' schemas (string-label vocabulary in block order) and statistics and
   publishes ONE new manifest version.

A failed or interrupted job publishes nothing: the driver cancels the tasks still running, waits
for them (bounded), and `Lake.commit` removes every data file that appeared during the job. A file
written by a worker that outlives that wait (e.g. a node that lost contact) is not referenced by any
manifest; ``lake.vacuum()`` removes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from m2m._validate import SplatBatch, validate_splats
from m2m.config import M2MConfig
from m2m.errors import (
    ConfigError,
    InternalError,
    InvalidEmbeddingError,
    LakeNotFoundError,
)
from m2m.lake import summary as lake_stats
from m2m.lake.arrow_input import arrow_metadata
from m2m.lake.commit import adopt_new_files, removed_on_failure
from m2m.lake.fs import LakeFS
from m2m.lake.ingest import discarding_new_lake, new_local_folder
from m2m.lake.integrity import WriteStamp
from m2m.lake.manifest import Manifest, ShardEntry
from m2m.lake.writer import (
    SchemaUpdate,
    rebase_schema,
    reconcile_schema,
    shard_rows,
    write_splats,
)
from m2m.ray import gather, require_ray

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Rows ``[start, stop)`` of one materialised block, at dataset row ``row0``."""

    ref: Any
    start: int
    stop: int
    row0: int


def _null_rows(column: Any) -> np.ndarray:
    """Positions of the null values of an Arrow column (a column of Arrow type null is null throughout)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_null(column.type):
        return np.arange(len(column))
    if column.null_count == 0:
        return np.empty(0, np.int64)
    return np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))


def _block_columns(block: Any, vector_column: str, label_column: str | None,
                   metadata_columns: Sequence[str], row0: int = 0,
                   null_types: dict[str, pa.DataType] | None = None) -> dict[str, Any]:
    """The wanted columns of a Ray block as numpy (tensor columns -> [n, d], lists -> stacked);
    ``row0``: the dataset row of the block's first (for messages); ``null_types``: the type of each
    metadata column in the other blocks, for a block where it is all nulls (Arrow types it ``null``)."""
    from ray.data.block import BlockAccessor

    accessor = BlockAccessor.for_block(block)
    batch = accessor.to_batch_format("numpy")
    arrow = accessor.to_arrow()
    vectors = batch[vector_column]
    nulls = _null_rows(arrow.column(vector_column))
    if len(nulls):  # (a block of null rows reached the writer as [nan]: "dimension 1, expected latent_dim ...")
        raise InvalidEmbeddingError(f"column {vector_column!r} is null in dataset row {row0 + int(nulls[0])} "
                                    f"({len(nulls)} null row(s) in its block); write_lake needs one vector per row")
    if vectors.dtype == object:  # variable-length list column: one array per row
        try:
            vectors = np.stack([np.asarray(v) for v in vectors]) if len(vectors) else vectors
        except ValueError as exc:
            raise InvalidEmbeddingError(f"column {vector_column!r} holds vectors of different lengths") from exc
    null_labels = _null_rows(arrow.column(label_column)) if label_column is not None else np.empty(0, np.int64)
    if len(null_labels):
        row = row0 + int(null_labels[0])
        raise InvalidEmbeddingError(f"label column {label_column!r} is null in dataset row {row}")
    # metadata through the local ingest's Arrow rules: a nullable int column is refused, not turned into
    # float64 NaNs (numpy's conversion rounded 2**53 + 1 to 2**53, silently); its row numbers count from row0
    where = f"the block from dataset row {row0}"
    return {"vectors": vectors, "labels": None if label_column is None else batch[label_column],
            "metadata": {name: arrow_metadata(_typed(arrow.column(name), name, null_types), name, where)
                         for name in metadata_columns}}


def _typed(column: Any, name: str, null_types: dict[str, pa.DataType] | None) -> Any:
    """``column``, cast to the column's type in the other blocks where this block holds only nulls (a
    string or float column was refused as "type null", or not, depending on how Ray cut the data)."""
    if pa.types.is_null(column.type) and null_types and name in null_types:
        return column.cast(null_types[name])
    return column


def _arrow_type(dtype: np.dtype) -> pa.DataType:
    """The Arrow type of the values `arrow_metadata` read as ``dtype`` (object: strings)."""
    return pa.string() if dtype.kind == "O" else pa.from_numpy_dtype(dtype)


def _write_pieces(fs: LakeFS, pieces: list[_Piece], first_id: int, dim: int, dtype: str, shard_bytes: int,
                  schema: SchemaUpdate, vector_column: str, label_column: str | None,
                  metadata_columns: Sequence[str], stamp: WriteStamp | None = None,
                  null_types: dict[str, pa.DataType] | None = None) -> dict[str, Any]:
    """Ray task: validate and write consecutive dataset rows as shards with ids ``first_id`` onward,
    each file stamped as the local writer stamps it (``stamp``: `m2m.lake.integrity.WriteStamp`)."""
    import ray
    from ray.data.block import BlockAccessor

    batches: list[SplatBatch] = []
    planned = schema
    summary: dict[str, Any] = {}
    for p in pieces:
        block = BlockAccessor.for_block(ray.get(p.ref)).slice(p.start, p.stop, copy=False)
        cols = _block_columns(block, vector_column, label_column, metadata_columns, p.row0, null_types)
        b = validate_splats(cols["vectors"], cols["labels"], None, None, cols["metadata"], dim, start=p.row0)
        planned = reconcile_schema(planned, b)
        summary = lake_stats.merge(summary, lake_stats.summarize(b.kappa, b.alpha))
        batches.append(b)
    with removed_on_failure(fs, "a failed write task"):  # (its shards stayed in the store: the driver never saw them)
        shards = write_splats(fs, batches, first_id, dim, dtype, shard_bytes, planned, stamp=stamp)
    rows = sum(b.rows for b in batches)
    return {"shards": shards, "rows": rows, "vocabulary": planned.label_vocabulary, "summary": summary}


def _column_dtypes(piece: _Piece, names: list[str]) -> list[str | None]:
    """Ray task: the numpy dtype (``dtype.str``) of each of ``names`` in one piece of a block."""
    import ray
    from ray.data.block import BlockAccessor

    block = BlockAccessor.for_block(ray.get(piece.ref)).slice(piece.start, piece.stop, copy=False)
    wanted: list[str | None] = list(names)
    arrow = BlockAccessor.for_block(BlockAccessor.for_block(block).select(wanted)).to_arrow()
    where = f"the block from dataset row {piece.row0}"
    # (the write tasks' Arrow rules: a nullable int column is refused here, before any planning); None: the
    # block holds only nulls there (typed by the other blocks)
    return [None if pa.types.is_null(arrow.column(n).type) else arrow_metadata(arrow.column(n), n, where).dtype.str
            for n in names]


def promoted_dtype(dtypes: Sequence[np.dtype]) -> np.dtype | None:
    """The one dtype that holds every block's values of a column as `Lake.add_splats` would type them
    all at once (numbers: numpy's promotion, ints with floats -> float; times: the finest unit), or
    None when the blocks differ in kind (the write tasks then refuse the mismatch, naming it) or only
    a float could hold them all (int64 with uint64)."""
    kinds = {d.kind for d in dtypes}
    if len(set(dtypes)) == 1:
        return dtypes[0]
    if not (kinds <= set("iuf") or kinds == {"M"} or kinds == {"m"}):
        return None
    out = np.result_type(*dtypes)
    return None if out.kind == "f" and kinds <= set("iu") else out


def _block_dtypes(ray: Any, pieces: list[tuple[_Piece, int]], names: list[str]) -> dict[str, np.dtype | None]:
    """The dtype all the blocks' values of each metadata column take together (`promoted_dtype`; None when
    they differ in kind, for the write tasks to refuse), from the blocks that hold more than nulls; a
    column no block types is left out."""
    if not names or len(pieces) < 2:
        return {}
    task = ray.remote(num_cpus=1, max_retries=0)(_column_dtypes)
    found = gather(ray, [task.remote(p, names) for p, _ in pieces])
    out: dict[str, np.dtype | None] = {}
    for i, name in enumerate(names):
        typed = [np.dtype(d[i]) for d in found if d[i] is not None]
        if typed:
            out[name] = promoted_dtype(typed)
    return out


def _unified_metadata(first: dict[str, Any], dtypes: dict[str, np.dtype | None]) -> None:
    """Type the first row's metadata (which plans a new lake's schema) as all the blocks' values would
    be typed together. Planned from the first row alone, a column of ints in the first block and
    floats in a later one was refused, or not, depending on how Ray had cut the dataset (observed)."""
    for name, dtype in dtypes.items():
        if dtype is not None and dtype != first["metadata"][name].dtype:
            first["metadata"][name] = first["metadata"][name].astype(dtype)


def _open_target(path_or_config: Any, dim_hint: int | None) -> Any:
    """The Lake to append to: an M2MConfig is created/opened as `create_m2m` does; a path is opened,
    or created with the dataset's vector width when there is no lake there yet."""
    from m2m.api import create_m2m, open_lake

    if isinstance(path_or_config, M2MConfig):
        if path_or_config.path is None:
            raise ConfigError("write_lake needs a lake path every Ray worker can reach; M2MConfig.path is None")
        return create_m2m(path_or_config)
    if not isinstance(path_or_config, (str, os.PathLike)):
        raise ConfigError(f"path_or_config must be a path, URL or M2MConfig, got {type(path_or_config).__name__}")
    try:
        return open_lake(path_or_config)
    except LakeNotFoundError:
        if dim_hint is None:
            raise
        return create_m2m(M2MConfig(path=os.fspath(path_or_config), latent_dim=dim_hint))


def _pieces(bundles: Any) -> list[tuple[_Piece, int]]:
    """(piece, rows) of every non-empty block of a materialised dataset, in order."""
    out: list[tuple[_Piece, int]] = []
    row0 = 0
    for bundle in bundles:
        slices = getattr(bundle, "slices", None) or (None,) * len(bundle.blocks)
        for entry, sl in zip(bundle.blocks, slices):
            ref, meta = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
            start, stop = (0, int(meta.num_rows)) if sl is None else (int(sl.start_offset), int(sl.end_offset))
            if stop > start:
                out.append((_Piece(ref, start, stop, row0), stop - start))
                row0 += stop - start
    return out


def _groups(pieces: list[tuple[_Piece, int]], target: int) -> list[list[_Piece]]:
    """Consecutive rows in groups of exactly ``target`` rows (the last may be smaller), blocks cut
    where a group ends, so that every task writes whole shards."""
    groups: list[list[_Piece]] = []
    current: list[_Piece] = []
    rows = 0
    for piece, _ in pieces:
        while piece.stop > piece.start:
            take = min(piece.stop - piece.start, target - rows)
            current.append(_Piece(piece.ref, piece.start, piece.start + take, piece.row0))
            piece = _Piece(piece.ref, piece.start + take, piece.stop, piece.row0 + take)
            rows += take
            if rows == target:
                groups.append(current)
                current, rows = [], 0
    if current:
        groups.append(current)
    return groups


def write_lake(ds: Any, path_or_config: Any, vector_column: str = "embedding", label_column: str | None = None,
               metadata_columns: Any = ()) -> Any:
    """Append the rows of Ray Dataset ``ds`` to a lake as ONE new version; returns the Lake (open).

    Args:
        ds: a ``ray.data.Dataset``.
        path_or_config: lake path/URL (created with the vectors' width if absent) or an `M2MConfig`
            with ``path`` set. Every Ray worker must reach it.
        vector_column: column of vectors (a tensor column or lists of equal length).
        label_column: optional column of int or string labels.
        metadata_columns: columns stored as metadata.

    Ids are ``lake.next_id`` onward in dataset order. Rows are validated and normalised exactly as
    `Lake.add_splats` does; any invalid row, failed task or interruption publishes nothing.
    """
    ray = require_ray()  # with ray.data loaded
    if not isinstance(ds, ray.data.Dataset):
        raise ConfigError(f"write_lake takes a ray.data.Dataset, got {type(ds).__name__}")
    meta_cols = [metadata_columns] if isinstance(metadata_columns, str) else list(metadata_columns)
    wanted = [vector_column] + ([label_column] if label_column is not None else []) + meta_cols
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"columns must be distinct, got {wanted}")
    names = ds.schema().names
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ConfigError(f"columns {missing} are not in the dataset; it has {list(names)}")

    t0 = time.perf_counter()
    selected = ds.select_columns(wanted)
    options = selected.context.execution_options
    old_order = options.preserve_order
    options.preserve_order = True  # blocks come back in dataset order: ids follow it
    try:
        materialized = selected.materialize()
        pieces = _pieces(materialized.iter_internal_ref_bundles())
    finally:
        options.preserve_order = old_order
    rows = sum(n for _, n in pieces)
    if rows == 0:
        raise InvalidEmbeddingError("nothing to add: the dataset has no rows")
    head = pieces[0][0]
    dtypes = _block_dtypes(ray, pieces, meta_cols)
    null_types = {name: _arrow_type(dt) for name, dt in dtypes.items() if dt is not None}
    first = _block_columns(ray.get(head.ref), vector_column, label_column, meta_cols, head.row0 - head.start,
                           null_types)
    first = {"vectors": np.asarray(first["vectors"])[head.start:head.start + 1],
             "labels": None if first["labels"] is None else first["labels"][head.start:head.start + 1],
             "metadata": {k: v[head.start:head.start + 1] for k, v in first["metadata"].items()}}
    if first["vectors"].ndim != 2:  # (a new lake was then "not found": no width to create it with)
        raise InvalidEmbeddingError(f"column {vector_column!r} holds values of shape {first['vectors'].shape[1:]} "
                                    "per row; write_lake needs one vector per row")
    dim_hint = int(first["vectors"].shape[1])
    _unified_metadata(first, dtypes)
    target = path_or_config.path if isinstance(path_or_config, M2MConfig) else path_or_config
    new_folder = new_local_folder(target) if isinstance(target, (str, os.PathLike)) else None
    lake = _open_target(path_or_config, dim_hint)
    try:
        # a failed first write removes the empty lake it made (as `m2m ingest` does): it blocked a retry
        with discarding_new_lake(lake, new_folder):
            _commit(ray, lake, pieces, rows, first, vector_column, label_column, meta_cols, null_types)
    except BaseException:
        lake.close()
        raise
    logger.info("write_lake: %d rows in %.1f s, version %d", rows, time.perf_counter() - t0, lake.version)
    return lake


def _commit(ray: Any, lake: Any, pieces: list[tuple[_Piece, int]], rows: int, first: dict[str, Any],
            vector_column: str, label_column: str | None, meta_cols: list[str],
            null_types: dict[str, pa.DataType] | None = None) -> None:
    from m2m.lake.manifest import read_manifest

    cfg = lake.config
    fs = lake._fs
    assumed: Manifest = read_manifest(fs)
    # the schema the tasks check against: the lake's, or (empty lake) the one the first rows define
    head = validate_splats(first["vectors"], first["labels"], None, None, first["metadata"], lake.dim)
    planned = reconcile_schema(SchemaUpdate.of(assumed), head)
    target = shard_rows(lake.dim, assumed.dtype, cfg.shard_bytes)
    groups = _groups(pieces, target)
    task = ray.remote(num_cpus=1, max_retries=0)(_write_pieces)

    def build(base: Manifest) -> Manifest:
        schema = rebase_schema(planned, assumed, base)
        refs = []
        next_id = base.next_id
        # the stamps of the local writer: each task's first shard follows the previous task's last id
        # (ids are contiguous from next_id), the lake's last shard for the first task; a task knows
        # only the vocabulary it was given (later tasks' new labels land behind earlier ones')
        prev_id = base.shards[-1].id_max if base.shards else -1
        for group in groups:
            n = sum(p.stop - p.start for p in group)
            stamp = WriteStamp(base.lake_id, prev_id, len(schema.label_vocabulary), append=True)
            refs.append(task.remote(fs, group, next_id, base.dim, base.dtype, cfg.shard_bytes, schema,
                                    vector_column, label_column, meta_cols, stamp, null_types))
            next_id += n
            prev_id = next_id - 1
        try:
            results = gather(ray, refs)
        except BaseException:
            # Lake.commit removes the files of a failed local commit; a store's tracks only this process's
            # writes, so the shards the finished tasks wrote are removed here (on S3 they stayed: observed)
            _remove_finished_shards(ray, fs, refs)
            raise
        shards: list[ShardEntry] = []
        vocab = list(schema.label_vocabulary)
        known = set(vocab)
        summary: dict[str, Any] = {}
        for res in results:
            shards += res["shards"]
            for v in res["vocabulary"]:
                if v not in known:
                    known.add(v)
                    vocab.append(v)
            summary = lake_stats.merge(summary, res["summary"])
        if sum(r["rows"] for r in results) != rows:
            raise InternalError(f"write tasks wrote {sum(r['rows'] for r in results)} rows, expected {rows}")
        new = base.next(shards=base.shards + tuple(shards), next_id=base.next_id + rows,
                        label_type=schema.label_type, label_vocabulary=tuple(vocab),
                        metadata=schema.metadata, stats=lake_stats.merge(base.stats, summary),
                        operation={"type": "append", "rows": rows, "engine": "ray", "tasks": len(groups)})
        adopt_new_files(fs, base, new)  # the tasks' shards: checked before the put, removed if not published
        return new

    lake.commit("append (ray)", build)
    lake._auto_compact()  # as add_splats does (config.auto_compact; write_lake ignored it)


def _remove_finished_shards(ray: Any, fs: LakeFS, refs: list[Any]) -> None:
    """Delete the shard files of the write tasks of ``refs`` that finished (their results list them)."""
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in done:
        try:
            result = ray.get(ref)
        except Exception:  # noqa: BLE001 - a failed task: what it wrote is not listed
            continue
        for entry in result.get("shards", ()):
            for f in entry.files:
                with contextlib.suppress(FileNotFoundError, OSError):
                    fs.remove(f.path)
