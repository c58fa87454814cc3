"""Read embedding files (.npy, .parquet, .arrow/.feather, or a directory of them) as chunks for a lake."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from m2m.errors import InvalidEmbeddingError

SUFFIXES = (".npy", ".parquet", ".arrow", ".feather", ".ipc")
CHUNK_ROWS = 65536


@dataclass(frozen=True)
class Source:
    """One or more embedding files read as chunks of ``{"vectors", "labels", "metadata"}``."""

    files: tuple[Path, ...]
    column: str | None = None
    label_column: str | None = None
    chunk_rows: int = CHUNK_ROWS

    def dim(self) -> int:
        """The vector width of the first file."""
        first = next(iter(self.chunks()))
        return int(np.asarray(first["vectors"]).shape[1])

    def rows(self) -> int:
        """Total rows over all files (reads only metadata)."""
        total = 0
        for f in self.files:
            if f.suffix == ".npy":
                total += int(np.load(f, mmap_mode="r").shape[0])
            elif f.suffix == ".parquet":
                total += pq.ParquetFile(f).metadata.num_rows
            else:
                total += _open_ipc(f).num_rows
        return total

    def chunks(self) -> Iterator[dict[str, Any]]:
        for f in self.files:
            if f.suffix == ".npy":
                if self.label_column is not None:
                    raise InvalidEmbeddingError(f"{f}: .npy files hold no columns; --label-column does not apply")
                yield from _npy_chunks(f, self.chunk_rows)
            else:
                yield from _table_chunks(f, self.column, self.label_column, self.chunk_rows)


def open_source(path: str | os.PathLike[str], column: str | None = None, label_column: str | None = None,
                chunk_rows: int = CHUNK_ROWS) -> Source:
    """A `Source` for a file or a directory of supported files (sorted by name)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir():
        files = tuple(sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file()))
        if not files:
            raise InvalidEmbeddingError(f"{p} holds no {'/'.join(SUFFIXES)} files")
    elif p.suffix in SUFFIXES:
        files = (p,)
    else:
        raise InvalidEmbeddingError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return Source(files, column, label_column, chunk_rows)


def _npy_chunks(f: Path, chunk_rows: int) -> Iterator[dict[str, Any]]:
    try:
        arr = np.load(f, mmap_mode="r")
    except ValueError as exc:
        raise InvalidEmbeddingError(f"{f} is not a readable .npy array: {exc}") from exc
    if arr.ndim != 2:
        raise InvalidEmbeddingError(f"{f} holds an array of shape {arr.shape}; expected [rows, dim]")
    for lo in range(0, arr.shape[0], chunk_rows):
        yield {"vectors": arr[lo:lo + chunk_rows]}


def _open_ipc(f: Path) -> pa.Table:
    try:
        return feather.read_table(f, memory_map=True)
    except (pa.ArrowInvalid, OSError):
        with pa.memory_map(str(f)) as src:
            return pa.ipc.open_stream(src).read_all()


def _pick_vector_column(schema: pa.Schema, column: str | None, where: Path) -> str:
    if column is not None:
        if column not in schema.names:
            raise InvalidEmbeddingError(f"{where}: no column {column!r}; columns: {schema.names}")
        return column
    for field in schema:
        if pa.types.is_fixed_size_list(field.type) or pa.types.is_list(field.type) \
                or pa.types.is_large_list(field.type):
            return field.name
    raise InvalidEmbeddingError(f"{where}: no list-of-float column found; name one with --column")


def _vectors(arr: pa.Array | pa.ChunkedArray, name: str, where: Path) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        raise InvalidEmbeddingError(f"{where}: column {name!r} has {arr.null_count} null rows")
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
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    raise InvalidEmbeddingError(f"{where}: column {name!r} has type {arr.type}, not a list of floats")


def _table_chunks(f: Path, column: str | None, label_column: str | None, chunk_rows: int) -> Iterator[dict[str, Any]]:
    if f.suffix == ".parquet":
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidEmbeddingError(f"{f} is not a readable Parquet file: {exc}") from exc
        schema = pf.schema_arrow
        name = _pick_vector_column(schema, column, f)
        cols = [name] + ([label_column] if label_column else [])
        if label_column and label_column not in schema.names:
            raise InvalidEmbeddingError(f"{f}: no label column {label_column!r}; columns: {schema.names}")
        batches: Iterator[pa.RecordBatch] = pf.iter_batches(batch_size=chunk_rows, columns=cols)
    else:
        try:
            table = _open_ipc(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidEmbeddingError(f"{f} is not a readable Arrow IPC/Feather file: {exc}") from exc
        name = _pick_vector_column(table.schema, column, f)
        if label_column and label_column not in table.schema.names:
            raise InvalidEmbeddingError(f"{f}: no label column {label_column!r}; columns: {table.schema.names}")
        batches = iter(table.to_batches(max_chunksize=chunk_rows))
    for batch in batches:
        chunk: dict[str, Any] = {"vectors": _vectors(batch.column(name), name, f)}
        if label_column:
            labels = batch.column(label_column)
            if labels.null_count:
                raise InvalidEmbeddingError(f"{f}: label column {label_column!r} has null rows")
            chunk["labels"] = labels.to_numpy(zero_copy_only=False)
        yield chunk
