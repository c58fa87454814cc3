"""One snapshot of a lake as Arrow data: `to_arrow` (a Table or a bounded-memory RecordBatchReader)
and `export_lake` (one Parquet or Arrow IPC file that pyarrow, Polars, DuckDB and HF `datasets` read).

A snapshot's rows live in shard files whose columns may come from several files (the shard's main
file and, after `estimate_kappa`, a geometry sidecar: later files win), next to the files of older
versions in the same folder. These functions resolve that from the manifest, so the caller gets
exactly the rows of one version with every column joined, one record batch per shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from m2m.errors import AlreadyExistsError, ConfigError, InvalidEmbeddingError, PathNotFoundError, WriteFailedError
from m2m.lake.fs import LakeFS
from m2m.lake.manifest import FileEntry, Manifest
from m2m.lake.schema import MU_NORM
from m2m.lake.shard import open_shard_file

FORMATS = ("parquet", "arrow")
SIDECAR_COLUMNS = ("neighbors", "neighbor_cos")

OpenFile = Callable[[FileEntry], pa.RecordBatch]


def has_norms(manifest: Manifest) -> bool:
    """Whether some shard of the version keeps its rows' norms (shards written before norms were kept
    have none)."""
    return any(MU_NORM in f.columns for s in manifest.shards for f in s.files)


def snapshot_columns(manifest: Manifest) -> list[str]:
    """Every column of a version, in export order."""
    names = ["id", "mu", "kappa", "alpha"] + ([MU_NORM] if has_norms(manifest) else [])
    if manifest.label_type is not None:
        names.append("label")
    if manifest.geometry is not None:
        names += list(SIDECAR_COLUMNS)
    return names + list(manifest.metadata)


def _pick_columns(manifest: Manifest, columns: Sequence[str] | None) -> list[str]:
    available = snapshot_columns(manifest)
    if columns is None:
        return available
    if isinstance(columns, str):
        columns = [columns]
    picked = list(dict.fromkeys(columns))
    unknown = [c for c in picked if c not in available]
    if unknown:
        raise ConfigError(f"columns {unknown} are not in lake version {manifest.version}; columns: {available}")
    if not picked:
        raise ConfigError("columns is empty: name at least one column (or give none for every column)")
    return picked


def _f32_list(array: pa.Array) -> pa.Array:
    """A fixed_size_list<float16> column as fixed_size_list<float32> (DuckDB reads no float16)."""
    width = array.type.list_size
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values), width)


def _column_types(manifest: Manifest, picked: list[str], float32: bool) -> dict[str, pa.DataType]:
    """The Arrow type of each exported column, known from the manifest (no file is read)."""
    mu_value = pa.float32() if float32 or manifest.dtype == "float32" else pa.float16()
    types: dict[str, pa.DataType] = {"id": pa.int64(), "mu": pa.list_(mu_value, manifest.dim),
                                     "kappa": pa.float32(), "alpha": pa.float32(), MU_NORM: pa.float64()}
    if manifest.label_type is not None:
        types["label"] = pa.string() if manifest.label_type == "string" else pa.int64()
    if manifest.geometry is not None:
        k = int(manifest.geometry["k"])
        types["neighbors"] = pa.list_(pa.int64(), k)
        types["neighbor_cos"] = pa.list_(pa.float32(), k)
    for name, alias in manifest.metadata.items():
        try:
            types[name] = pa.type_for_alias(alias)
        except ValueError:  # a type without a short alias (e.g. timestamp[ns, tz=UTC]): taken from the files
            continue
        if float32 and types[name] == pa.float16():  # (DuckDB reads no float16 metadata either)
            types[name] = pa.float32()
    return {name: types[name] for name in picked if name in types}


def _schema_metadata(manifest: Manifest, original: bool) -> dict[bytes, bytes]:
    doc = {"format": "m2m-lake-export", "lake_version": manifest.version, "dim": manifest.dim,
           "stored_dtype": manifest.dtype, "label_type": manifest.label_type, "geometry": manifest.geometry,
           "mu": "original" if original else "unit"}
    return {b"m2m": json.dumps(doc, sort_keys=True).encode()}


def _original(mu: pa.Array, norms: pa.Array | None) -> pa.Array:
    """``mu * mu_norm`` as fixed_size_list<float32>, multiplied in float64 (a shard without norms: ``mu``)."""
    width = mu.type.list_size
    unit = mu.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    if norms is None:
        values = unit.astype(np.float32)
    else:
        scale = norms.to_numpy(zero_copy_only=False).astype(np.float64)
        wide = np.multiply(unit, np.nan_to_num(scale, nan=1.0)[:, None], dtype=np.float64)
        # a float32 input at the edge of its range can come back a rounding step above FLT_MAX (it read inf);
        # a float64 input beyond float32's range has no float32 original (it read inf, silently)
        top = float(np.finfo(np.float32).max)
        over = np.abs(wide) > top
        if over.any():
            beyond = np.abs(wide) > top * (1 + 2.0**-22)  # more than the float32 rounding of the stored unit row
            if beyond.any():
                raise InvalidEmbeddingError(f"an original vector has the value {wide[beyond][0]:.6g}, beyond float32's "
                                            "range: it was added as float64; read it with original=False (unit vectors "
                                            "and mu_norm) instead")
            np.clip(wide, -top, top, out=wide)
        values = wide.astype(np.float32)
        # the other edge: a float64 row so small that it is all zeros in float32 (it read as a zero vector,
        # silently, though the lake refuses zero vectors)
        lost = ~values.any(axis=1) & (wide != 0).any(axis=1)
        if lost.any():
            row = int(np.argmax(lost))
            raise InvalidEmbeddingError(f"an original vector (norm {float(np.nan_to_num(scale[row])):.6g}) is below "
                                        "float32's range: it was added as float64; read it with original=False "
                                        "(unit vectors and mu_norm) instead")
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def snapshot_batches(manifest: Manifest, open_file: OpenFile, columns: Sequence[str] | None = None,
                     float32: bool = False, original: bool = False) -> pa.RecordBatchReader:
    """A RecordBatchReader of one version: one batch per shard, each column from the file that wins.

    Only one shard's files are open at a time (beyond what ``open_file`` caches), so iterating holds
    O(shard) memory. A shard written after the last `estimate_kappa` has no sidecar: its
    ``neighbors``/``neighbor_cos`` are null; a shard written before norms were kept has a null
    ``mu_norm``. ``original``: ``mu`` is each row's vector as given (``mu * mu_norm``, float32; the
    unit vector where no norm was kept).
    """
    picked = _pick_columns(manifest, columns)
    known = _column_types(manifest, picked, float32 or original)
    missing = [c for c in picked if c not in known]
    if missing:  # rare metadata types: read them from the first shard's main file
        first = open_file(manifest.shards[0].file_for(missing[0])) if manifest.shards else None
        for name in missing:
            known[name] = first.schema.field(name).type if first is not None else pa.null()
    schema = pa.schema([pa.field(n, known[n]) for n in picked], metadata=_schema_metadata(manifest, original))

    def batches() -> Iterator[pa.RecordBatch]:
        for shard in manifest.shards:
            opened: dict[str, pa.RecordBatch] = {}
            arrays = []
            for field in schema:
                try:
                    entry = shard.file_for(field.name)
                except KeyError:
                    if field.name not in SIDECAR_COLUMNS + (MU_NORM,):
                        raise
                    arrays.append(pa.nulls(shard.rows, field.type))
                    continue
                batch = opened.get(entry.path)
                if batch is None:
                    batch = opened[entry.path] = open_file(entry)
                col = batch.column(field.name)
                if field.name == "mu" and original:
                    norms = batch.column(MU_NORM) if MU_NORM in batch.schema.names else None
                    col = _original(col, norms)
                elif field.name == "mu" and col.type != field.type:
                    col = _f32_list(col)
                elif col.type != field.type:
                    col = col.cast(field.type)
                arrays.append(col)
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def lake_file_opener(fs: LakeFS, manifest: Manifest, verify: bool, verified: set[str] | None = None,
                     checked: set[tuple[object, ...]] | None = None) -> OpenFile:
    """Open shard files of ``fs`` (files of ``manifest``), checking each file's CRC32 once per ``verified``
    set when ``verify``, and its footer, ids, lake id and kappa run against ``manifest`` once per
    ``checked`` set (`m2m.lake.integrity.check_batch`): an export of a manifest edited with its hash
    recomputed wrote other rows' labels, silently, before (observed on remote and format-3 lakes)."""
    from m2m.lake.integrity import check_batch, check_key, file_name, files_of

    seen: set[str] = set() if verified is None else verified
    done: set[tuple[object, ...]] = set() if checked is None else checked
    shard_of = {f.path: i for i, f in files_of(manifest)}

    def open_file(entry: FileEntry) -> pa.RecordBatch:
        check = verify and entry.path not in seen
        batch = open_shard_file(fs, entry, verify=check)
        if check:
            seen.add(entry.path)
        key = check_key(manifest, shard_of[entry.path], entry)
        if key not in done:
            check_batch(manifest, shard_of[entry.path], entry, batch, file_name(fs, entry.path))
            done.add(key)
        return batch

    return open_file


def export_lake(reader: pa.RecordBatchReader, out: str | os.PathLike[str], fmt: str = "parquet",
                progress: Callable[[int], None] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``reader``'s batches to one file ``out`` (Parquet, or an Arrow IPC file), atomically.

    The file appears under its final name only when complete (written to a temp name, fsynced,
    renamed). Parquet gets one row group per shard batch, zstd-compressed. Returns rows and bytes.
    An existing ``out`` is refused (`AlreadyExistsError`) unless ``overwrite``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = os.fspath(out)
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise PathNotFoundError(f"{directory} does not exist (the folder of {out})")
    if os.path.lexists(out) and not overwrite:
        raise AlreadyExistsError(f"{out} already exists; pass --force (overwrite=True) to replace it")
    if os.path.isdir(out):
        raise AlreadyExistsError(f"{out} is a directory; name a file to export to")
    tmp = os.path.join(directory, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex}")
    rows = 0
    try:
        with contextlib.ExitStack() as files:
            # pyarrow opens only UTF-8 names ("'utf-8' codec can't encode ... surrogates not allowed" for a
            # file or folder named in another encoding): such a path is opened here and handed over
            sink: Any = tmp if _utf8(tmp) else files.enter_context(open(tmp, "wb"))  # noqa: SIM115
            rows = _write(reader, sink, fmt, progress)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:  # e.g. a full disk
            raise WriteFailedError(exc.errno, f"{exc.strerror or exc} while writing {out}") from exc
        raise
    return {"rows": rows, "bytes": os.path.getsize(out), "path": out, "format": fmt}


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _write(reader: Any, sink: Any, fmt: str, progress: Callable[[int], None] | None) -> int:
    """Write ``reader``'s batches to ``sink`` (a path or an open binary file) as ``fmt``; the rows written."""
    import pyarrow.parquet as pq

    rows = 0
    if fmt == "parquet":
        with pq.ParquetWriter(sink, reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch, row_group_size=max(1, batch.num_rows))
                rows += batch.num_rows
                if progress is not None:
                    progress(batch.num_rows)
        return rows
    opened = pa.OSFile(sink, "wb") if isinstance(sink, str) else contextlib.nullcontext(sink)
    with opened as f, pa.ipc.new_file(f, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
            if progress is not None:
                progress(batch.num_rows)
    return rows
