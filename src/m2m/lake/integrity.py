"""Cross-checks of a manifest's numbers against its shard files (Arrow footers and id columns).

Three levels, from cheap to complete:

- `check_batch`: a file's record batch against its manifest entry: row count, every listed column
  present with the type the manifest implies (``mu`` is ``fixed_size_list<dtype>[dim]``, ...),
  and the first/last id equal to the shard's ``id_min``/``id_max``. Touches the footer, the batch
  header and two id values; with ``full`` also checks that ids strictly ascend (reads the id column).
- `check_file`: the same from a path: size against ``bytes``, one record batch, then `check_batch`.
  `Snapshot` runs it on every file of a local lake when it is opened (a few small reads per file)
  and on every file of a remote lake when that file is first used (the first use downloads the
  file into the shard cache anyway, so opening a remote lake costs no request per file).
- `verify_files`: size, CRC32 and the full `check_batch` of every file of a version (what
  `Lake.verify` and `m2m verify` run).

The manifest's own consistency (checksum, ranges, names) is checked when it is parsed
(`m2m.lake.manifest.Manifest.from_json`).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

from m2m.errors import CorruptShardError
from m2m.lake.fs import LakeFS
from m2m.lake.manifest import FileEntry, Manifest
from m2m.lake.schema import ALPHA, ID, KAPPA, LABEL, MU, MU_NORM, NEIGHBOR_COS, NEIGHBORS

_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def expected_type(m: Manifest, column: str) -> pa.DataType | str:
    """The Arrow type (or, for metadata, the type string) the manifest implies for ``column``."""
    if column == ID:
        return pa.int64()
    if column == MU:
        return pa.list_(_DTYPES[m.dtype], m.dim)
    if column in (KAPPA, ALPHA):
        return pa.float32()
    if column == MU_NORM:
        return pa.float64()
    if column == LABEL and m.label_type is not None:
        return pa.string() if m.label_type == "string" else pa.int64()
    if column in (NEIGHBORS, NEIGHBOR_COS):
        k = int((m.geometry or {}).get("k", -1))
        return pa.list_(pa.int64() if column == NEIGHBORS else pa.float32(), k)
    return m.metadata.get(column, "?")


def _type_ok(actual: pa.DataType, want: pa.DataType | str) -> bool:
    if isinstance(want, str):
        return str(actual) == want
    if pa.types.is_fixed_size_list(want):
        return (pa.types.is_fixed_size_list(actual) and actual.list_size == want.list_size
                and actual.value_type == want.value_type)
    return bool(actual == want)


def check_batch(m: Manifest, shard: int, entry: FileEntry, batch: pa.RecordBatch, where: str,
                full: bool = False) -> None:
    """`CorruptShardError` naming ``where`` when ``batch`` (file ``entry`` of shard ``shard``) disagrees
    with the manifest (see the module doc)."""
    s = m.shards[shard]
    if batch.num_rows != s.rows:
        raise CorruptShardError(f"shard file {where} has {batch.num_rows} rows, the manifest says {s.rows} "
                                f"(shard {shard} of version {m.version})")
    names = batch.schema.names
    for col in entry.columns:
        if col not in names:
            raise CorruptShardError(f"shard file {where} has no column {col!r} (the manifest lists it; "
                                    f"the file has {names})")
        want = expected_type(m, col)
        actual = batch.schema.field(col).type
        if not _type_ok(actual, want):
            raise CorruptShardError(f"shard file {where}: column {col!r} is {actual}, the manifest implies {want}")
    if ID in entry.columns:
        ids = batch.column(ID)
        if ids.null_count:
            raise CorruptShardError(f"shard file {where}: column 'id' has {ids.null_count} nulls")
        first, last = ids[0].as_py(), ids[-1].as_py()
        if (first, last) != (s.id_min, s.id_max):
            raise CorruptShardError(f"shard file {where} holds ids {first}..{last}, the manifest says "
                                    f"{s.id_min}..{s.id_max} (shard {shard} of version {m.version})")
        if full:
            arr = ids.to_numpy(zero_copy_only=True)
            step = np.diff(arr)
            if len(step) and not (step > 0).all():
                row = int(np.argmax(step <= 0)) + 1
                raise CorruptShardError(f"shard file {where}: ids do not strictly ascend at row {row} "
                                        f"({arr[row - 1]} then {arr[row]})")


def open_batch(path: str, expected_bytes: int) -> pa.RecordBatch:
    """The single record batch of the Arrow IPC file at ``path`` (memory-mapped; sizes checked first)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError as exc:
        raise CorruptShardError(f"shard file {path} is missing") from exc
    if size != expected_bytes:
        raise CorruptShardError(f"shard file {path} has {size} bytes, the manifest says {expected_bytes}")
    try:
        reader = pa.ipc.open_file(pa.memory_map(path, "r"))  # the batch keeps the map alive
        if reader.num_record_batches != 1:
            raise CorruptShardError(f"shard file {path} holds {reader.num_record_batches} record batches, expected 1")
        return reader.get_batch(0)
    except (pa.ArrowInvalid, pa.ArrowIOError, pa.ArrowNotImplementedError, ValueError) as exc:
        raise CorruptShardError(f"shard file {path} cannot be read: {exc}") from exc


def check_file(fs: LakeFS, m: Manifest, shard: int, entry: FileEntry, full: bool = False) -> None:
    """`check_batch` of one file, opened from ``fs`` (a remote file is fetched into the shard cache)."""
    path = fs.local_path(entry.path)
    batch = open_batch(path, entry.bytes)
    check_batch(m, shard, entry, batch, path, full=full)


def check_key(m: Manifest, shard: int, entry: FileEntry) -> tuple[object, ...]:
    """What a footer check of ``entry`` depends on: a memo of checked keys stays valid across versions."""
    s = m.shards[shard]
    types = tuple(str(expected_type(m, c)) for c in entry.columns)
    return (entry.path, entry.bytes, s.rows, s.id_min, s.id_max, types)


def files_of(m: Manifest) -> Iterable[tuple[int, FileEntry]]:
    """``(shard index, file)`` of every file of ``m``."""
    return ((i, f) for i, s in enumerate(m.shards) for f in s.files)


def check_footers(fs: LakeFS, m: Manifest, done: set[tuple[object, ...]] | None = None) -> None:
    """`check_file` (footers only) of every file of ``m`` whose `check_key` is not in ``done``; adds them."""
    for i, f in files_of(m):
        key = check_key(m, i, f)
        if done is not None and key in done:
            continue
        check_file(fs, m, i, f)
        if done is not None:
            done.add(key)


def verify_files(fs: LakeFS, m: Manifest, progress: Callable[[int], None] | None = None) -> list[str]:
    """Size, CRC32 and full footer/id checks of every file of ``m``; returns the problems found."""
    from m2m.lake.shard import verify_file

    problems = []
    for i, f in files_of(m):
        try:
            verify_file(fs, f)
            check_file(fs, m, i, f, full=True)
        except CorruptShardError as exc:
            problems.append(str(exc))
        if progress is not None:
            progress(1)
    return problems
