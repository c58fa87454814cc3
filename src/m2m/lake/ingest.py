"""Read embeddings as bounded chunks for a lake: files (.npy, .parquet, .arrow/.feather/.ipc), directories
(flat, or hive-partitioned through `pyarrow.dataset`), and in-memory Arrow data (a `pyarrow.Table`,
`RecordBatch`, `RecordBatchReader`, an iterable of batches, anything with ``__arrow_c_stream__`` such as
a Polars DataFrame, or a Hugging Face `datasets.Dataset`).

Chunks are sized in bytes (``chunk_bytes``, rows = bytes / row width), Parquet is read one row group
at a time through a small read buffer, and the vector width comes from the schema (a fixed_size_list
type) or the first row, so the input is read once and memory stays bounded by a few chunks.

No input file is memory-mapped: .npy rows are read with ``pread`` one chunk at a time, Arrow IPC
files through ``pyarrow.OSFile`` one record batch at a time, so an input cut short while it is read
(``cp`` over it truncates it first) is a one-line `InvalidEmbeddingError` naming it, never SIGBUS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m2m._validate import check_rows
from m2m.errors import (
    ConfigError,
    DimensionMismatchError,
    InvalidEmbeddingError,
    M2MError,
    PathNotFoundError,
    WriteFailedError,
    in_chunk,
)
from m2m.lake.arrow_input import arrow_metadata, plain
from m2m.lake.fs import local_path
from m2m.lake.manifest import DATA_DIR, MANIFEST_DIR

SUFFIXES = (".npy", ".parquet", ".pq", ".parq", ".arrow", ".feather", ".ipc")   # any case
TABLE_SUFFIXES = (".parquet", ".pq", ".parq", ".arrow", ".feather", ".ipc")
_KINDS = {".npy": "npy", ".parquet": "parquet", ".pq": "parquet", ".parq": "parquet", ".arrow": "ipc",
          ".feather": "ipc", ".ipc": "ipc"}


def file_kind(path: Path) -> str | None:
    """"npy", "parquet" or "ipc" by the file's suffix (any case: .pq and .PARQUET are Parquet too; a
    directory's .pq files were skipped, silently), None for other files."""
    return _KINDS.get(path.suffix.lower())
CHUNK_BYTES = 4 << 20           # input decoded per step (about 400 rows of 2,560 float32): with three
                                # 128 MiB shard buffers, a 1 GB Parquet ingest peaked at 569 MB RSS (32 MiB: 713 MB)
PARQUET_BUFFER_BYTES = 8 << 20  # Parquet column data read through a buffer of this size, not whole


@dataclass(frozen=True)
class Columns:
    """Which input columns become what: the vectors, the labels, and the metadata columns to keep."""

    column: str | None = None
    label_column: str | None = None
    meta_columns: tuple[str, ...] = ()
    all_columns: bool = False

    def resolve(self, schema: pa.Schema, where: Any) -> tuple[str, str | None, list[str]]:
        """(vector column, label column, metadata columns) of ``schema``; errors name ``where``.

        An m2m export (`m2m export`, `Lake.to_arrow`) with ``all_columns`` re-ingests the rows it came
        from: ``mu`` (times ``mu_norm``) the vectors, ``label`` the labels, ``kappa``/``alpha`` the splats'
        own (`export_terms`), and the columns the lake derives itself (`DERIVED_COLUMNS`) left out.
        """
        export = self.all_columns and is_m2m_export(schema)
        vec = _pick_vector_column(schema, self.column if self.column is not None or not export else "mu", where)
        label = self.label_column
        if export and label is None and "label" in schema.names and vec != "label":
            label = "label"
        if label == vec:
            raise InvalidEmbeddingError(f"{where}: column {vec!r} cannot be both the vectors and the labels")
        if label is not None and label not in schema.names:
            raise InvalidEmbeddingError(f"{where}: no label column {label!r}; columns: {schema.names}")
        missing = [m for m in self.meta_columns if m not in schema.names]
        if missing:
            raise InvalidEmbeddingError(f"{where}: no metadata column {missing[0]!r}; columns: {schema.names}")
        meta = list(dict.fromkeys(self.meta_columns))
        if self.all_columns:
            skip = (*DERIVED_COLUMNS, *EXPORT_TERMS) if export else ()
            meta += [n for n in schema.names if n not in (vec, label) and n not in meta and n not in skip]
        clash = [m for m in meta if m in (vec, label)]
        if clash:
            raise InvalidEmbeddingError(f"{where}: column {clash[0]!r} cannot be both vectors/labels and metadata")
        return vec, label, meta


#: Columns of an m2m export that a lake makes itself: a re-ingest gets new ids (estimate_kappa makes the
#: neighbours again); ``mu_norm`` goes back into the vectors
DERIVED_COLUMNS = ("id", "neighbors", "neighbor_cos", "mu_norm")
#: Columns of an m2m export that re-ingest as the splats' own terms (`add_splats`' keywords)
EXPORT_TERMS = ("kappa", "alpha")


def _export_doc(schema: pa.Schema) -> dict[str, Any]:
    """The ``m2m`` schema metadata of an m2m export (`m2m.lake.export`), or {}."""
    import json

    try:
        doc = json.loads((schema.metadata or {}).get(b"m2m", b"{}"))
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) and doc.get("format") == "m2m-lake-export" else {}


def export_rows(unit: np.ndarray, norms: np.ndarray, storage_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """An m2m export's rows for a lake of ``storage_dtype``: ``(vectors, norms)``, where ``norms`` (not
    None) means ``vectors`` are unit vectors to store as they are with these norms.

    Into a lake of the export's own dtype its ``mu`` and ``mu_norm`` (NaN: 1) are stored as given, bit for
    bit, when every ``mu`` is at unit norm to that dtype's precision. Otherwise the vectors as given,
    ``mu * mu_norm`` in float64, are ingested like any input: a float16 export into a float32 lake then
    keeps the source lake's original vectors within 1 ulp (scaling ``mu`` to norm 1 first had moved them
    by up to 2e-4)."""
    try:
        unit = np.asarray(unit)
        scale = np.nan_to_num(np.asarray(norms, dtype=np.float64).reshape(-1), nan=1.0)
    except (TypeError, ValueError) as exc:
        raise InvalidEmbeddingError(f"mu_norm must be numbers, one per row: {exc}") from None
    if unit.ndim != 2 or len(scale) != len(unit):
        raise InvalidEmbeddingError(f"mu_norm has {len(scale)} values for vectors of shape {unit.shape}: one per row")
    if unit.dtype.kind != "f":
        return unit.astype(np.float64) * scale[:, None], None
    if storage_dtype == "float16" and unit.dtype == np.float32 and np.array_equal(
            unit.astype(np.float16).astype(np.float32), unit):
        unit = unit.astype(np.float16)  # a float16 lake's `export --float32`: its mu exactly
    if unit.dtype == np.dtype(storage_dtype) and unit.size and np.all(np.isfinite(scale)) and np.all(scale > 0):
        length = np.sqrt(np.einsum("ij,ij->i", unit, unit, dtype=np.float64))
        # a float16 unit vector's norm is 1 within its half-ulp, 2**-11 (float32: 2**-24); 4x that passes
        tol = 2.0**-9 if unit.dtype == np.float16 else 2.0**-20
        if np.all(np.abs(length - 1.0) <= tol):
            return unit, scale
    return unit.astype(np.float64) * scale[:, None], None


def is_m2m_export(schema: pa.Schema) -> bool:
    """Whether ``schema`` is that of an m2m export (its ``m2m`` schema metadata says so)."""
    return bool(_export_doc(schema))


def export_terms(schema: pa.Schema, columns: Columns, vec: str) -> dict[str, str]:
    """The chunk keys an m2m export re-ingested fills from its own columns: ``mu_norm`` when its ``mu``
    holds unit vectors (whatever columns were asked: without ``all_columns`` every row's length was
    dropped, silently), and with ``all_columns`` also ``kappa``/``alpha``."""
    doc = _export_doc(schema)
    if not doc:
        return {}
    terms = {name: name for name in EXPORT_TERMS if name in schema.names} if columns.all_columns else {}
    if doc.get("mu") == "unit" and vec == "mu" and "mu_norm" in schema.names:
        terms["mu_norm"] = "mu_norm"
    return terms


# ---------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """One or more embedding files, or a dataset directory, read as chunks of
    ``{"vectors", "labels", "metadata"}`` (one read of each file)."""

    files: tuple[Path, ...]
    column: str | None = None
    label_column: str | None = None
    chunk_rows: int | None = None       # fixed rows per chunk; None: sized from chunk_bytes
    meta_columns: tuple[str, ...] = ()
    all_columns: bool = False
    chunk_bytes: int = CHUNK_BYTES
    dataset_root: Path | None = None    # a partitioned directory read through pyarrow.dataset
    widen: tuple[tuple[str, pa.DataType], ...] = ()   # metadata types unified over a flat directory's files

    @property
    def columns(self) -> Columns:
        return Columns(self.column, self.label_column, tuple(self.meta_columns), self.all_columns)

    def dim(self) -> int:
        """The vector width: from the first file's header or schema (reads at most one row)."""
        if self.dataset_root is not None:
            return _dataset_reader(self).dim()
        for f in self.files:  # the first file with rows: an empty part file has no width to read
            reader = _file_reader(f, self)
            if reader.rows() > 0:
                return reader.dim()
        return _file_reader(self.files[0], self).dim()

    def rows(self) -> int:
        """Total rows over all inputs (reads only headers and footers)."""
        if self.dataset_root is not None:
            return _dataset_reader(self).rows()
        pinned = self.pinned()
        return sum(_file_reader(f, pinned).rows() for f in self.files)

    def chunks(self) -> Iterator[dict[str, Any]]:
        if self.dataset_root is not None:
            yield from _dataset_reader(self).chunks()
            return
        pinned = self.pinned().widened()
        first: tuple[Path, int] | None = None
        for f in self.files:
            reader = _file_reader(f, pinned)
            if len(self.files) > 1 and reader.rows() > 0:  # (the lake's check named no file of a directory)
                if first is None:
                    first = (f, reader.dim())
                elif reader.dim() != first[1]:
                    raise DimensionMismatchError(f"{f}: vectors have dimension {reader.dim()}, "
                                                 f"the first file {first[0]} has {first[1]}")
            if len(self.files) == 1:
                yield from reader.chunks()
                continue
            row = 0  # (the lake's check counted rows over all files and named none: "vectors row 550")
            for chunk in reader.chunks():
                check_rows(chunk["vectors"], row, f"{f}: vectors")
                row += len(chunk["vectors"])
                yield chunk

    def widened(self) -> "Source":
        """This source with its metadata columns' types unified over the table files of a flat
        directory, as a partitioned directory's are (`_one_schema`): an int32 column in one file and
        int64 values in the next were refused against the first file's type, where the partitioned
        layout widened them. A column whose types have no lossless common widening is left as each file
        has it: its values are checked against the lake's column chunk by chunk (`check_cast`)."""
        tables = [f for f in self.files if file_kind(f) != "npy"]
        if len(tables) < 2 or not (self.meta_columns or self.all_columns) or self.widen:
            return self
        first = _file_reader(tables[0], self)
        assert isinstance(first, _ArrowReader)
        meta = first.meta
        del first
        # one file open at a time (a reader keeps its file open: 1,000 files hit the open-file limit)
        schemas = [_table_schema(f, self) for f in tables]
        widen = []
        for name in meta:
            types = [sch.field(name).type for sch in schemas if name in sch.names]
            wide = _widening(name, types, tables[0].parent, refuse=False)
            if wide is not None and len({str(t) for t in types}) > 1:
                widen.append((name, wide))
        return dataclasses.replace(self, widen=tuple(widen)) if widen else self

    def pinned(self) -> "Source":
        """This source with the vector column that its first table file picks (no ``column`` given)
        named for every file: a file without it is refused. Picked per file, a directory whose second
        file listed another list column first ingested that column as its vectors (observed)."""
        if self.column is not None or len(self.files) < 2:
            return self
        first = next((f for f in self.files if file_kind(f) != "npy"), None)
        if first is None:
            return self
        reader = _file_reader(first, self)
        assert isinstance(reader, _ArrowReader)
        return dataclasses.replace(self, column=reader.vec)


def open_source(path: str | os.PathLike[str], column: str | None = None, label_column: str | None = None,
                chunk_rows: int | None = None, meta_columns: Iterable[str] = (), all_columns: bool = False,
                chunk_bytes: int = CHUNK_BYTES) -> Source:
    """A `Source` for a file, a flat directory of supported files (sorted by name), or a directory with
    sub-directories (hive-partitioned ``key=value/`` folders included) read through `pyarrow.dataset`,
    whose partition keys are columns usable as metadata."""
    p = Path(path)
    if not p.exists():
        raise PathNotFoundError(f"{p} does not exist")
    _refuse_a_lakes_own_files(p)
    if chunk_bytes < 1:
        raise InvalidEmbeddingError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    common: dict[str, Any] = {"column": column, "label_column": label_column, "chunk_rows": chunk_rows,
                              "meta_columns": tuple(meta_columns), "all_columns": all_columns,
                              "chunk_bytes": chunk_bytes}
    if p.is_dir():
        if any(c.is_dir() and not c.name.startswith((".", "_")) for c in p.iterdir()):
            return Source((), dataset_root=p, **common)
        files = tuple(sorted(f for f in p.iterdir() if file_kind(f) is not None and f.is_file()))
        if not files:
            raise InvalidEmbeddingError(f"{p} holds no {'/'.join(SUFFIXES)} files")
    elif file_kind(p) is not None:
        files = (p,)
    else:
        raise InvalidEmbeddingError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return Source(files, **common)


def _refuse_a_lakes_own_files(p: Path) -> None:
    """`ConfigError` when ``p`` is an m2m lake's folder, or lies in one of its own folders (``_data``...):
    its shard files are every version's still on disk (a compacted run's too), so ``m2m ingest LAKE/_data``
    copied the rows twice, silently, and without their original lengths."""
    here = p.resolve()
    for root in (here, *here.parents[:2]):
        if (root / MANIFEST_DIR).is_dir() and (root / DATA_DIR).is_dir():
            rel = here.relative_to(root).parts
            if not rel or rel[0].startswith("_"):
                raise ConfigError(f"{p} is {'the m2m lake' if not rel else 'inside the m2m lake'} {root}: its "
                                  "files hold every version still on disk; to copy its rows, export them "
                                  f"(m2m export {root} rows.parquet) and ingest that file with --all-columns")
            return


def _rows_per_chunk(source_rows: int | None, chunk_bytes: int, dim: int, itemsize: int) -> int:
    if source_rows is not None:
        return max(1, int(source_rows))
    return max(1, chunk_bytes // max(1, dim * max(itemsize, 4)))


class _Reader:
    """What each input kind provides: rows, dim, and chunks."""

    def rows(self) -> int:
        raise NotImplementedError

    def dim(self) -> int:
        raise NotImplementedError

    def chunks(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


@dataclass(frozen=True)
class _NpyHeader:
    rows: int
    dim: int
    dtype: np.dtype
    fortran: bool
    offset: int          # where the data starts

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * self.dtype.itemsize


class _NpyReader(_Reader):
    """A .npy file read with positional reads of one chunk of rows at a time (never a memory map: a
    file cut short while it is read becomes `InvalidEmbeddingError` naming it, not SIGBUS)."""

    def __init__(self, f: Path, source: Source) -> None:
        self.f, self.source = f, source
        if source.label_column is not None or source.meta_columns or source.all_columns:
            raise InvalidEmbeddingError(f"{f}: .npy files hold no columns; --label-column/--meta-column/"
                                        "--all-columns do not apply")

    def _header(self) -> _NpyHeader:
        with open(self.f, "rb") as fh:
            header = _npy_header(self.f, fh)
            size = os.fstat(fh.fileno()).st_size
        if size < header.offset + header.nbytes:
            raise InvalidEmbeddingError(f"{self.f} is truncated or corrupt: {size} bytes, its header promises "
                                        f"{header.offset + header.nbytes} ({header.rows} x {header.dim} "
                                        f"{header.dtype})")
        return header

    def rows(self) -> int:
        return self._header().rows

    def dim(self) -> int:
        return self._header().dim

    def chunks(self) -> Iterator[dict[str, Any]]:
        # a fresh array per chunk, read with pread: memory is one chunk, whatever the file's size
        h = self._header()
        n, dim, dtype = h.rows, h.dim, h.dtype
        step = _rows_per_chunk(self.source.chunk_rows, self.source.chunk_bytes, dim, dtype.itemsize)
        with open(self.f, "rb", buffering=0) as fh:
            fd = fh.fileno()
            for lo in range(0, n, step):
                rows = min(step, n - lo)
                if not h.fortran:
                    chunk = np.empty((rows, dim), dtype=dtype)
                    self._pread(fd, h.offset + lo * dim * dtype.itemsize, chunk, lo, n)
                else:  # column-major: each column's rows are contiguous; one read per column
                    cols = np.empty((dim, rows), dtype=dtype)
                    for j in range(dim):
                        self._pread(fd, h.offset + (j * n + lo) * dtype.itemsize, cols[j], lo, n)
                    chunk = np.ascontiguousarray(cols.T)
                yield {"vectors": chunk}

    def _pread(self, fd: int, at: int, dst: np.ndarray, lo: int, n: int) -> None:
        view = dst.reshape(-1).view(np.uint8).data
        done = 0
        while done < len(view):
            try:
                got = os.preadv(fd, [view[done:]], at + done)
            except OSError as exc:
                raise InvalidEmbeddingError(f"{self.f} cannot be read at byte {at + done} (rows {lo}.. of {n}): "
                                            f"{exc.strerror or exc}") from exc
            if got == 0:  # the file was cut short after its size was checked
                raise InvalidEmbeddingError(f"{self.f} is truncated or corrupt: it ends at byte {at + done}, inside "
                                            f"rows {lo}.. of {n} (was it changed while being read?)")
            done += got


def _npy_header_3(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a version 3.0 .npy header, ``fh`` just past its magic: a
    little-endian uint32 length, then a utf-8 Python dict literal. (numpy's private reader of it moved
    in numpy 2.4: the call raised a raw AttributeError.)"""
    import ast
    import struct

    raw = fh.read(4)
    if len(raw) != 4:
        raise InvalidEmbeddingError("the header length is cut short")
    (length,) = struct.unpack("<I", raw)
    text = fh.read(length)
    if len(text) != length:
        raise InvalidEmbeddingError("the header is cut short")
    header = ast.literal_eval(text.decode("utf-8"))
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise InvalidEmbeddingError(f"the header is not a .npy header dict: {text[:80]!r}")
    shape = tuple(int(n) for n in header["shape"])
    return shape, bool(header["fortran_order"]), np.lib.format.descr_to_dtype(header["descr"])


def _npy_header(f: Path, fh: BinaryIO) -> _NpyHeader:
    """The shape, dtype, order and data offset of the .npy file open as ``fh``; refuses what m2m cannot
    ingest (pickled objects, not 2-D, not a .npy file) with one line naming ``f``."""
    fmt = np.lib.format
    if fh.read(6) != b"\x93NUMPY":  # np.load would try to unpickle it and suggest allow_pickle
        raise InvalidEmbeddingError(f"{f} is not a .npy file (it does not start with the NumPy header); "
                                    "save arrays with numpy.save")
    fh.seek(0)
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:  # (3, 0): the 2.0 layout with a utf-8 header (field names); numpy has no public reader for it
            shape, fortran, dtype = _npy_header_3(fh)
    except (ValueError, OSError, EOFError, SyntaxError, KeyError, TypeError) as exc:
        raise InvalidEmbeddingError(f"{f} is not a readable .npy array (truncated or corrupt header?): "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise InvalidEmbeddingError(f"{f} holds Python objects (dtype {dtype}), not numbers; m2m reads "
                                    ".npy files of float or int arrays")
    if len(shape) != 2:
        raise InvalidEmbeddingError(f"{f} holds an array of shape {tuple(shape)}; expected [rows, dim]")
    return _NpyHeader(int(shape[0]), int(shape[1]), dtype, bool(fortran), fh.tell())


class _ArrowReader(_Reader):
    """Anything that yields Arrow record batches with a known schema."""

    def __init__(self, where: Any, schema: pa.Schema, columns: Columns, chunk_rows: int | None, chunk_bytes: int,
                 num_rows: Callable[[], int], batches: Callable[[list[str], int], Iterator[pa.RecordBatch]],
                 first_row: Callable[[str], pa.RecordBatch | None] | None) -> None:
        self.where, self.schema, self.columns = where, schema, columns
        self.widen: dict[str, pa.DataType] = {}   # metadata read as these types (`Source.widened`)
        self._chunk_rows, self._chunk_bytes = chunk_rows, chunk_bytes
        self._num_rows, self._batches, self._first_row = num_rows, batches, first_row
        twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
        named = {columns.column, columns.label_column, *columns.meta_columns} - {None}
        if twice and (columns.all_columns or named & set(twice) or columns.column is None):
            # (pyarrow's KeyError 'Field "m" exists 2 times in schema' was a raw traceback); a name the
            # ingest does not read may repeat
            raise InvalidEmbeddingError(f"{where}: column name(s) {twice} appear more than once; rename them")
        self.vec, self.label, self.meta = columns.resolve(schema, where)
        self.terms = export_terms(schema, columns, self.vec)
        typ = schema.field(self.vec).type
        if _is_list(typ) and not (pa.types.is_floating(typ.value_type) or pa.types.is_integer(typ.value_type)):
            # (a list of strings failed in pyarrow's words: "Non-fixed width type")
            raise InvalidEmbeddingError(f"{where}: column {self.vec!r} holds lists of {typ.value_type}, not numbers")

    def rows(self) -> int:
        return self._num_rows()

    def dim(self) -> int:
        typ = self.schema.field(self.vec).type
        if pa.types.is_fixed_size_list(typ):
            return int(typ.list_size)
        first = None if self._first_row is None else self._first_row(self.vec)
        if first is None or first.num_rows == 0:
            raise InvalidEmbeddingError(f"{self.where} has no rows")
        return int(_vectors(first.column(self.vec), self.vec, self.where).shape[1])

    def chunks(self) -> Iterator[dict[str, Any]]:
        typ = self.schema.field(self.vec).type
        itemsize = max(1, typ.value_type.bit_width // 8) if hasattr(typ, "value_type") else 4
        if self._first_row is not None and self._num_rows() == 0:
            return  # an empty part file: nothing to read, and no width to size chunks from
        step: int | None = None
        if self._chunk_rows is not None or pa.types.is_fixed_size_list(typ) or self._first_row is not None:
            step = _rows_per_chunk(self._chunk_rows, self._chunk_bytes, self.dim(), itemsize)
        # variable-length lists of in-memory data: sized from the first batch's width
        wanted = [self.vec] + ([self.label] if self.label else []) + self.meta + list(self.terms.values())
        batches = self._batches(wanted, step or _rows_per_chunk(None, self._chunk_bytes, 1024, itemsize))
        done = 0  # rows of the input before this batch
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:  # a truncated or corrupt page, an unreadable fragment
                raise InvalidEmbeddingError(f"{self.where} cannot be read (truncated or corrupt?): {exc}") from exc
            if step is None:
                if batch.num_rows == 0:
                    continue
                width = _vectors(batch.column(self.vec).slice(0, 1), self.vec, self.where).shape[1]
                step = _rows_per_chunk(None, self._chunk_bytes, width, itemsize)
            for lo in range(0, batch.num_rows, step):
                with in_chunk(done + lo):
                    chunk = self._chunk(batch.slice(lo, step))
                yield chunk
            done += batch.num_rows

    def _chunk(self, batch: pa.RecordBatch) -> dict[str, Any]:
        chunk: dict[str, Any] = {"vectors": _vectors(batch.column(self.vec), self.vec, self.where)}
        if self.label:
            labels = plain(batch.column(self.label))
            if labels.null_count:
                row = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
                raise InvalidEmbeddingError(f"{self.where}: label column {self.label!r} has null rows (row {row} is "
                                            "null)")
            chunk["labels"] = labels.to_numpy(zero_copy_only=False)
        if self.meta:
            chunk["metadata"] = {m: arrow_metadata(plain(batch.column(m)).cast(self.widen[m]) if m in self.widen
                                                   else batch.column(m), m, self.where) for m in self.meta}
        for key, name in self.terms.items():  # an m2m export's own kappa/alpha (nulls: NaN) and norms
            values = plain(batch.column(name)).to_numpy(zero_copy_only=False).astype(np.float64)
            # mu_norm: applied by `export_rows` in Lake.add_splat_chunks, which knows the lake's dtype
            chunk[key] = values
        if "kappa" in self.terms:
            chunk["kappa_nan"] = True  # rows the exported lake had not estimated
        return chunk


def _parquet_reader(f: Path, source: Source) -> _ArrowReader:
    try:
        pf = pq.ParquetFile(f, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidEmbeddingError(f"{f} is not a readable Parquet file (truncated or corrupt?): {exc}") from exc

    def batches(cols: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        # one row group at a time, ``rows`` rows per batch, column data through the read buffer
        return pf.iter_batches(batch_size=rows, columns=cols, use_threads=True)

    def first_row(col: str) -> pa.RecordBatch | None:
        return next(pf.iter_batches(batch_size=1, columns=[col]), None)

    return _ArrowReader(f, pf.schema_arrow, source.columns, source.chunk_rows, source.chunk_bytes,
                        lambda: pf.metadata.num_rows, batches, first_row)


def _ipc_reader(f: Path, source: Source) -> _ArrowReader:
    """Arrow IPC file (Feather v2) or stream format, read one record batch at a time through a plain
    file (``pyarrow.OSFile``: positional reads into buffers this process owns, never a memory map, so
    a file cut short while it is read is `InvalidEmbeddingError` naming it, not SIGBUS). Only the
    columns asked for are decoded; memory is one record batch (the file format reads only those
    columns' bytes; the stream format reads each whole batch)."""

    def fail(exc: BaseException) -> InvalidEmbeddingError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return InvalidEmbeddingError(f"{f} is not a readable Arrow IPC/Feather file (truncated or corrupt?): {first}")

    def opened(fields: list[int] | None) -> tuple[pa.OSFile, Any, bool]:
        """(file, reader, is the random-access file format) reading only ``fields`` (None: all)."""
        fh = pa.OSFile(str(f))
        options = None if fields is None else pa.ipc.IpcReadOptions(included_fields=fields)
        try:
            try:
                return fh, pa.ipc.open_file(fh, options=options), True
            except pa.ArrowInvalid:  # not the file format: the stream format, read in order
                fh.seek(0)
                return fh, pa.ipc.open_stream(fh, options=options), False
        except BaseException:
            fh.close()
            raise

    try:
        fh, reader, _ = opened(None)
        schema = reader.schema
        fh.close()
    except (pa.ArrowException, OSError) as exc:
        raise fail(exc) from exc

    def selected(cols: list[str]) -> Generator[pa.RecordBatch, None, None]:
        try:
            # included_fields=[] would mean every field
            fh, reader, random_access = opened([schema.get_field_index(c) for c in cols] or [0])
            with fh:
                if random_access:
                    for i in range(reader.num_record_batches):
                        yield reader.get_batch(i).select(cols)
                else:
                    for b in reader:
                        yield b.select(cols)
        except (pa.ArrowException, OSError) as exc:
            raise fail(exc) from exc

    def batches(cols: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        return selected(cols)

    def first_row(col: str) -> pa.RecordBatch | None:
        gen = selected([col])
        try:
            for b in gen:
                if b.num_rows:
                    return b.slice(0, 1)
        finally:
            gen.close()
        return None

    def num_rows() -> int:
        return sum(b.num_rows for b in selected([]))

    return _ArrowReader(f, schema, source.columns, source.chunk_rows, source.chunk_bytes, num_rows, batches,
                        first_row)


def _file_reader(f: Path, source: Source) -> _Reader:
    kind = file_kind(f)
    if kind == "npy":
        return _NpyReader(f, source)
    reader = _parquet_reader(f, source) if kind == "parquet" else _ipc_reader(f, source)
    reader.widen = dict(source.widen)
    return reader


def _one_schema(dataset: Any, root: Path, columns: Columns) -> pa.Schema:
    """The schema the files of a partitioned ``dataset`` are read with: the columns the ingest reads
    (``columns`` resolved against the first file) unified over every file (widened where they differ:
    float16 and float64 vectors to float64), the other columns and the partition keys as pyarrow
    found them. pyarrow reads every file with the first one's schema: later files' float64 vectors were
    rounded to float16, int labels became strings and columns the first file lacked were dropped, all
    silently. A read column missing from a file, or types without a lossless common widening, are
    refused naming the files."""
    fragments = list(dataset.get_fragments())
    if not fragments:
        raise InvalidEmbeddingError(f"{root} holds no {'/'.join(TABLE_SUFFIXES)} files")
    schemas = [f.physical_schema for f in fragments]
    partitioning = getattr(dataset, "partitioning", None)
    keys = set(partitioning.schema.names) if partitioning is not None else set()
    for frag, schema in zip(fragments, schemas):
        clash = sorted(keys & set(schema.names))
        if clash:  # pyarrow gives the folder's value precedence: the file's own column was dropped, silently
            raise InvalidEmbeddingError(f"{root}: {frag.path} has a column {clash[0]!r}, which is also a partition "
                                        f"key of its folders ({clash[0]}=...); rename one of them")
    vec, label, meta = columns.resolve(dataset.schema, root)
    read = [vec, *([label] if label else []), *meta, *export_terms(dataset.schema, columns, vec).values()]
    read = [n for n in dict.fromkeys(read) if n in schemas[0].names]  # (partition keys are no file's)
    for frag, schema in zip(fragments, schemas):
        missing = [n for n in read if n not in schema.names]
        if missing:
            raise InvalidEmbeddingError(f"{root}: {frag.path} has no column {missing[0]!r} ({fragments[0].path} "
                                        "has it); the files of a partitioned directory must have the columns "
                                        "the ingest reads")
    extra = sorted({n for s in schemas for n in s.names} - set(schemas[0].names) - set(dataset.schema.names))
    if columns.all_columns and extra:
        has = next(f.path for f, s in zip(fragments, schemas) if extra[0] in s.names)
        raise InvalidEmbeddingError(f"{root}: {has} has a column {extra[0]!r} that {fragments[0].path} lacks; "
                                    "with --all-columns the files of a partitioned directory must have the same "
                                    "columns")
    unified = {name: pa.field(name, _widening(name, [s.field(name).type for s in schemas], root)) for name in read}
    return pa.schema([unified.get(f.name, f) for f in dataset.schema], metadata=dataset.schema.metadata)


def _widening(name: str, types: list[pa.DataType], root: Path, refuse: bool = True) -> pa.DataType | None:
    """The type a column of ``types`` (one per file) is read as: their permissive widening (dictionary
    and large strings as the values they hold, as `plain` reads them), refused where it is not lossless;
    ``refuse=False``: None there instead (a flat directory then checks each file's values as it goes)."""
    plain = [_plain_type(t) for t in types]
    try:
        wide = pa.unify_schemas([pa.schema([pa.field(name, t)]) for t in plain],
                                promote_options="permissive").field(name).type
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        if not refuse:
            return None
        raise InvalidEmbeddingError(f"{root}: column {name!r} has types that differ between its files beyond a "
                                    f"common widening ({exc}); cast them to one type first") from exc
    lossy = _lossy_widening(plain, wide)
    if lossy:
        if not refuse:
            return None
        raise InvalidEmbeddingError(f"{root}: column {name!r} is {lossy} in some files and {wide} would "
                                    "round or overflow it; cast the files to one type first")
    return wide


def _plain_type(t: pa.DataType) -> pa.DataType:
    """The type `plain` reads a column of type ``t`` as (dictionaries decoded, large strings as strings)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    return t


def _table_schema(f: Path, source: Source) -> pa.Schema:
    """The Arrow schema of table file ``f`` (its reader, and the file it holds open, dropped at once)."""
    reader = _file_reader(f, source)
    assert isinstance(reader, _ArrowReader)   # (npy files are left out by the caller)
    return reader.schema


def _lossy_widening(types: list[pa.DataType], wide: pa.DataType) -> pa.DataType | None:
    """A type among ``types`` whose values ``wide`` (their permissive widening) may not hold exactly:
    64-bit ints into floats (2**53 + 1), uint64 into int64; lists by their values."""
    def value(t: pa.DataType) -> pa.DataType:
        return t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) \
            else t

    w = value(wide)
    for t in types:
        v = value(t)
        if pa.types.is_integer(v) and (pa.types.is_floating(w) and v.bit_width > (24 if w.bit_width == 32 else 53)
                                       or pa.types.is_unsigned_integer(v) and pa.types.is_signed_integer(w)
                                       and v.bit_width >= w.bit_width):
            return t
    return None


def _walk(root: Path) -> Iterator[Path]:
    """The files below ``root``, following symlinked folders as pyarrow's discovery does (Path.rglob of
    Python 3.11 does not: a symlinked partition was skipped, silently), each real folder once."""
    seen: set[str] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        for name in names:
            path = Path(folder) / name
            if path.is_file():
                yield path


def _dataset_reader(source: Source) -> _ArrowReader:
    import pyarrow.dataset as ds

    root = source.dataset_root
    assert root is not None
    # the table files only (a README or _SUCCESS beside them made pyarrow fail reading its schema), hidden
    # ones (".", "_" anywhere in the path below root) left out as pyarrow does
    files = sorted(str(p) for p in _walk(root) if file_kind(p) is not None
                   and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))
    kinds = {file_kind(Path(f)) for f in files}
    if not files:
        raise InvalidEmbeddingError(f"{root} holds no {'/'.join(TABLE_SUFFIXES)} files")
    if "npy" in kinds or len(kinds) > 1:
        raise InvalidEmbeddingError(f"{root}: a partitioned directory must hold one table format "
                                    f"(found {sorted(str(k) for k in kinds)}); .npy files only in flat directories")
    fmt = "parquet" if kinds == {"parquet"} else "ipc"
    try:
        found = ds.dataset(files, format=fmt, partitioning=ds.HivePartitioning.discover(),
                           partition_base_dir=str(root))
        schema = _one_schema(found, root, source.columns)
        dataset = ds.dataset(files, format=fmt, schema=schema,
                             partitioning=ds.HivePartitioning.discover(), partition_base_dir=str(root))
    except (pa.ArrowException, OSError) as exc:
        raise InvalidEmbeddingError(f"{root} cannot be read as a {fmt} dataset: {exc}") from exc

    def batches(cols: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        return iter(dataset.to_batches(columns=cols, batch_size=rows, batch_readahead=1, fragment_readahead=1))

    def first_row(col: str) -> pa.RecordBatch | None:
        t = dataset.head(1, columns=[col])
        # (an empty part file, as Spark, Dask and Polars write, gives a 0-row first batch)
        return next((b for b in t.to_batches() if b.num_rows), None)

    return _ArrowReader(root, dataset.schema, source.columns, source.chunk_rows, source.chunk_bytes,
                        dataset.count_rows, batches, first_row)


@contextlib.contextmanager
def naming_write_errors(lake_path: str) -> Iterator[None]:
    """Re-raise an OSError that names no file (a full disk, a quota, a file-size limit hit while writing
    shards) with the lake's data folder in the message."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None or isinstance(exc, M2MError):
            raise
        raise WriteFailedError(exc.errno, f"{exc.strerror or exc} while writing shard files under "
                                 f"{lake_path}/_data (nothing was committed)") from exc


def new_local_folder(path: str | os.PathLike[str]) -> str | None:
    """The local folder ``path`` names (`local_path`) when nothing exists there yet or it is an empty
    folder (a user's ``mkdir L`` first), else None (an object store URL, or an entry that holds
    something): where `discarding_new_lake` may remove a lake."""
    local = local_path(path)
    if local is None:
        return None
    if not os.path.lexists(local):
        return local
    if os.path.isdir(local) and not os.path.islink(local) and not os.listdir(local):
        return local + os.sep  # (the trailing separator: the folder was there; only its contents go)
    return None


@contextlib.contextmanager
def discarding_new_lake(lake: Any, folder: str | None) -> Iterator[None]:
    """Remove the lake a failed first write made in ``folder`` (`new_local_folder`; None: keep it), so that
    the same command can be run again (an empty lake left behind blocked it: another width, dtype or
    schema); never a lake another process committed to meanwhile, or one whose state cannot be read."""
    import shutil

    try:
        yield
    except BaseException:
        if folder is not None and lake.version == 0 and _never_committed(lake):
            lake.close()
            if folder.endswith(os.sep):  # the user's empty folder: it stays, the lake made in it goes
                for entry in set(os.listdir(folder)) & {"_data", "_manifests", "_segments", "_lock"}:  # m2m's own
                    target = os.path.join(folder, entry)
                    if os.path.isdir(target) and not os.path.islink(target):
                        shutil.rmtree(target, ignore_errors=True)
                    else:  # (as rmtree's ignore_errors: a failed clean-up must not replace the write's error)
                        with contextlib.suppress(OSError):
                            os.remove(target)
            else:
                shutil.rmtree(folder, ignore_errors=True)
        raise


def _never_committed(lake: Any) -> bool:
    """Whether no version was committed to ``lake`` (by any process); False when that cannot be read."""
    try:
        return bool(lake.refresh() == 0)
    except Exception:  # noqa: BLE001 -- the write's own error is raised; the lake is then left as it is
        return False


# ---------------------------------------------------------------------------------------------- in memory
def is_tabular(data: Any) -> bool:
    """True for Arrow tables/batches/readers, objects exporting an Arrow stream (Polars, ...), Hugging Face
    datasets and lists/tuples of Arrow batches or tables."""
    if isinstance(data, (pa.Table, pa.RecordBatch, pa.RecordBatchReader)):
        return True
    if isinstance(data, np.ndarray) or type(data).__module__.startswith("torch"):
        return False
    if _is_hf_dataset(data):
        return True
    if hasattr(data, "__arrow_c_stream__"):
        if type(data).__module__.startswith("pandas"):
            return False  # a DataFrame of numbers is a [rows, dim] array, as np.asarray reads it
        # a Polars (or other) frame is a table only when it has a list column to take vectors from;
        # a wide frame of numeric columns stays a [rows, dim] array
        schema = pa.RecordBatchReader.from_stream(data).schema
        return any(pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                   for f in schema)
    return isinstance(data, (list, tuple)) and len(data) > 0 and isinstance(data[0], (pa.RecordBatch, pa.Table))


def is_batch_iterator(data: Any) -> bool:
    """True for a one-shot iterator (e.g. a generator); its first item decides whether it is Arrow data."""
    return isinstance(data, Iterator)


def _is_hf_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("datasets") and hasattr(data, "with_format") and hasattr(data, "features")


def table_chunks(data: Any, columns: Columns, chunk_bytes: int = CHUNK_BYTES,
                 where: str = "the input table") -> Callable[[], Iterator[dict[str, Any]]]:
    """A one-pass ``chunks()`` callable (for `Lake.add_splat_chunks`) over in-memory Arrow data.

    ``data``: a `pyarrow.Table`, `RecordBatch` or `RecordBatchReader`, a Hugging Face `datasets.Dataset`,
    an object with ``__arrow_c_stream__`` (e.g. a Polars DataFrame), or an iterable of record batches
    or tables (read once).
    """
    schema, source = _in_memory(data, where)
    used = {"done": False}

    def batches(cols: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        if used["done"]:
            raise InvalidEmbeddingError(f"{where} is a one-shot stream and was already read")
        used["done"] = True
        for item in source(rows):
            if isinstance(item, pa.Table):
                item = item.combine_chunks() if item.num_rows else item
                yield from (b.select(cols) for b in item.to_batches(max_chunksize=rows))
            elif isinstance(item, pa.RecordBatch):
                if not item.schema.equals(schema, check_metadata=False):
                    missing = [c for c in cols if c not in item.schema.names]
                    if missing:
                        raise InvalidEmbeddingError(f"{where}: a batch has no column {missing[0]!r}")
                yield item.select(cols)
            else:
                raise InvalidEmbeddingError(f"{where}: expected Arrow record batches or tables, got {type(item)}")

    reader = _ArrowReader(where, schema, columns, None, chunk_bytes, lambda: -1, batches, None)

    def chunks() -> Iterator[dict[str, Any]]:
        return reader.chunks()

    return chunks


def _in_memory(data: Any, where: str) -> tuple[pa.Schema, Callable[[int], Iterator[Any]]]:
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        table = data
        return table.schema, lambda rows: iter(table.to_batches(max_chunksize=rows))
    if isinstance(data, pa.RecordBatchReader):
        reader = data
        return reader.schema, lambda rows: iter(reader)
    if _is_hf_dataset(data):
        arrow = data.with_format("arrow")   # a view; respects select/shuffle index mappings
        schema = data.features.arrow_schema
        return schema, lambda rows: iter(arrow.iter(batch_size=rows))
    if hasattr(data, "__arrow_c_stream__"):
        reader = pa.RecordBatchReader.from_stream(data)
        return reader.schema, lambda rows: iter(reader)
    try:
        it = iter(data)
    except TypeError:
        raise InvalidEmbeddingError(f"{where}: expected a pyarrow Table, RecordBatch or RecordBatchReader, an "
                                    f"object with __arrow_c_stream__, a datasets.Dataset or an iterable of record "
                                    f"batches, got {type(data).__name__}") from None
    try:
        first = next(it)
    except StopIteration:
        raise InvalidEmbeddingError(f"{where} is empty (no record batches)") from None
    if not isinstance(first, (pa.RecordBatch, pa.Table)):
        raise InvalidEmbeddingError(f"{where}: expected Arrow record batches or tables, got {type(first)}")

    def again(rows: int) -> Iterator[Any]:
        yield first
        yield from it

    return first.schema, again


# ---------------------------------------------------------------------------------------------- columns
def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t))


def _pick_vector_column(schema: pa.Schema, column: str | None, where: Any) -> str:
    if column is not None:
        if column not in schema.names:
            raise InvalidEmbeddingError(f"{where}: no column {column!r}; columns: {schema.names}")
        return column
    for field in schema:
        if _is_list(field.type):
            return field.name
    raise InvalidEmbeddingError(f"{where}: no list-of-float column found; name the vector column "
                                "(lake.add_table(data, column=...), m2m ingest --column)")


def _vectors(arr: pa.Array | pa.ChunkedArray, name: str, where: Any) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidEmbeddingError(f"{where}: column {name!r} has {arr.null_count} null rows (the first: row {first})")
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = np.diff(arr.offsets.to_numpy())
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.argmax(lengths != lengths[0]))
            raise InvalidEmbeddingError(f"{where}: column {name!r} row {row} has {lengths[row]} values, "
                                        f"row 0 has {lengths[0]}")
        width = int(lengths[0]) if len(lengths) else 0
        if width == 0 and len(lengths):  # (numpy's "cannot reshape array of size 0" before)
            raise InvalidEmbeddingError(f"{where}: column {name!r} holds empty lists: vectors need at least one value")
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    raise InvalidEmbeddingError(f"{where}: column {name!r} has type {arr.type}, not a list of floats")
