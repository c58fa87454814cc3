"""Shard files: uncompressed Arrow IPC files (one record batch), memory-mappable, with a CRC32."""

from __future__ import annotations

import os
import uuid
import zlib
from typing import Any, BinaryIO, Mapping

import numpy as np
import pyarrow as pa

from m2m.errors import CorruptShardError
from m2m.lake.fs import LakeFS, fsync_path
from m2m.lake.manifest import DATA_DIR, FileEntry

_CRC_CHUNK = 16 << 20


def to_arrow(name: str, values: np.ndarray) -> pa.Array:
    """An Arrow array for a numpy column: 2-D arrays become fixed_size_list columns (zero-copy)."""
    if values.ndim == 2:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if values.dtype == object:
        return pa.array(values.tolist(), type=pa.string())
    return pa.array(values)


def file_crc32(path: str) -> int:
    """CRC32 of a whole file, read in large chunks."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(_CRC_CHUNK)
            if not buf:
                return crc
            crc = zlib.crc32(buf, crc)


class _CrcSink:
    """A binary file wrapper that keeps the CRC32 of everything written through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.crc = 0
        self.size = 0

    def write(self, data: Any) -> int:
        self.crc = zlib.crc32(data, self.crc)
        n = self._f.write(data)
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        return self._f.closed


def write_shard_file(fs: LakeFS, columns: Mapping[str, np.ndarray | pa.Array]) -> FileEntry:
    """Write one immutable shard file holding ``columns`` and return its manifest entry.

    The file gets a fresh unique name; it belongs to no version until a manifest listing it is
    committed, and `Lake.commit` fsyncs it before publishing that manifest.
    """
    arrays = {k: v if isinstance(v, pa.Array) else to_arrow(k, v) for k, v in columns.items()}
    batch = pa.RecordBatch.from_pydict(arrays)
    rel = f"{DATA_DIR}/{uuid.uuid4().hex}.arrow"
    local = fs.local_path(rel) if fs.is_local else fs.new_local_file(".arrow")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(local, "wb") as f:
        sink = _CrcSink(f)
        with pa.PythonFile(sink, mode="w") as out:
            with pa.ipc.new_file(out, batch.schema) as writer:
                writer.write_batch(batch)
        f.flush()
        os.fsync(f.fileno())  # here, on the writer thread, overlapped with preparing the next shard
    if not fs.is_local:
        fs.write_file(rel, local)
    return FileEntry(path=rel, bytes=sink.size, crc32=sink.crc, columns=tuple(arrays))


def sync_files(fs: LakeFS, rels: list[str]) -> None:
    """Make newly written local files and their directories durable (no-op for remote stores)."""
    if not fs.is_local or not rels:
        return
    paths = [fs.local_path(rel) for rel in rels]
    for path in paths + sorted({os.path.dirname(p) for p in paths}):
        fsync_path(path)


def verify_file(fs: LakeFS, entry: FileEntry) -> None:
    """Raise `CorruptShardError` naming the file if its size or CRC32 differs from the manifest."""
    path = fs.local_path(entry.path)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError as exc:
        raise CorruptShardError(f"shard file {path} is missing") from exc
    if size != entry.bytes:
        raise CorruptShardError(f"shard file {path} has {size} bytes, the manifest says {entry.bytes}")
    crc = file_crc32(path)
    if crc != entry.crc32:
        raise CorruptShardError(f"shard file {path} is corrupt: CRC32 {crc:#010x} != manifest {entry.crc32:#010x}")


def open_shard_file(fs: LakeFS, entry: FileEntry, verify: bool = True) -> pa.RecordBatch:
    """Memory-map a shard file and return its single record batch (zero-copy)."""
    if verify:
        verify_file(fs, entry)
    path = fs.local_path(entry.path)
    try:
        source = pa.memory_map(path, "r")
        reader = pa.ipc.open_file(source)
        if reader.num_record_batches != 1:
            raise ValueError(f"expected 1 record batch, found {reader.num_record_batches}")
        batch = reader.get_batch(0)
        missing = set(entry.columns) - set(batch.schema.names)
        if missing:
            raise ValueError(f"columns {sorted(missing)} are missing")
        batch.validate(full=False)
    except (pa.ArrowInvalid, pa.ArrowIOError, ValueError) as exc:
        raise CorruptShardError(f"shard file {path} cannot be read: {exc}") from exc
    return batch


def column_to_numpy(array: pa.Array) -> np.ndarray:
    """A numpy view of an Arrow column: fixed_size_list -> [rows, k]; strings -> object array."""
    if pa.types.is_fixed_size_list(array.type):
        width = array.type.list_size
        flat = array.flatten()
        return flat.to_numpy(zero_copy_only=True).reshape(-1, width)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.to_numpy(zero_copy_only=False)
    return array.to_numpy(zero_copy_only=array.null_count == 0)
