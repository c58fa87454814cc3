"""Shard files: uncompressed Arrow IPC files (one record batch), with a CRC32 of the whole file
and a crc32c of each `BLOCK_BYTES`-byte block.

Nothing here memory-maps a shard: a mapped file that is cut short (``cp`` over it truncates it
first) kills the process with SIGBUS when a page past the new end is touched. Every read is
positional (``preadv``) into memory this process owns, so a short read becomes `CorruptShardError`
naming the file:

- `ShardFile` reads byte ranges and checks every block it reads against the manifest's block
  checksums (what the stream and `read_column` use). crc32c, because the ``crc32c`` package uses
  the CPU's hardware instructions (the figures: docs/tuning.md, "Figures behind source comments").
- `open_shard_file` reads a whole file into a private buffer (checked in the same pass) and opens
  the Arrow batch over it (to_arrow, export, string columns).
- `column_extents` and `read_header` read only the Arrow metadata (a few small reads at both ends
  of the file) into a sparse private buffer: columns' byte offsets and the footer checks, without
  reading data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import uuid
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import crc32c
import numpy as np
import pyarrow as pa

from m2m._forksafe import ForkSafeLock
from m2m.errors import ConfigError, CorruptShardError
from m2m.lake.checksum import fd_sha256
from m2m.lake.fs import LakeFS, fsync_path, write_error
from m2m.lake.manifest import DATA_DIR, FileEntry, key_of

_CRC_CHUNK = 16 << 20
# Checksum block size: small enough that a random or edge read re-reads little (a 13 KB label
# range costs one 256 KiB block, not a 1 MiB one), large enough that the manifest stays small
# (4,096 checksums per GB of shards).
BLOCK_BYTES = 256 << 10


def to_arrow(name: str, values: np.ndarray) -> pa.Array:
    """An Arrow array for a numpy column: 2-D arrays become fixed_size_list columns (zero-copy)."""
    if values.ndim == 2:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if values.dtype == object:
        return pa.array(values.tolist(), type=pa.string())
    return pa.array(values)


class _CrcSink:
    """A binary file wrapper that keeps the CRC32 of everything written through it, and the
    crc32c of each ``block_bytes``-byte block of it."""

    def __init__(self, f: BinaryIO, block_bytes: int = BLOCK_BYTES, sha256: bool = False) -> None:
        self._f = f
        self.sha = hashlib.sha256() if sha256 else None  # a signed lake's files: see FileEntry.sha256
        self.crc = 0
        self.size = 0
        self.block_bytes = block_bytes
        self.blocks: list[int] = []
        self._block_crc = 0
        self._block_fill = 0

    def write(self, data: Any) -> int:
        self.crc = zlib.crc32(data, self.crc)
        view = memoryview(data).cast("B")
        if self.sha is not None:
            self.sha.update(view)
        at = 0
        while at < len(view):  # the data may straddle block boundaries
            take = min(len(view) - at, self.block_bytes - self._block_fill)
            self._block_crc = crc32c.crc32c(view[at: at + take], self._block_crc)
            self._block_fill += take
            at += take
            if self._block_fill == self.block_bytes:
                self.blocks.append(self._block_crc)
                self._block_crc, self._block_fill = 0, 0
        n = self._f.write(data)
        self.size += n
        return n

    def block_checksums(self) -> tuple[int, ...]:
        """Every block's crc32c, the last (partial) block included."""
        return tuple(self.blocks + ([self._block_crc] if self._block_fill else []))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        return self._f.closed


def write_shard_file(fs: LakeFS, columns: Mapping[str, np.ndarray | pa.Array],
                     stamp: Mapping[str, str] | None = None) -> FileEntry:
    """Write one immutable shard file holding ``columns`` and return its manifest entry.

    ``stamp``: key/values stored in the Arrow schema metadata (lake id, ...; `m2m.lake.integrity`).

    The file gets a fresh unique name; it belongs to no version until a manifest listing it is
    committed, and `Lake.commit` fsyncs it before publishing that manifest.
    """
    arrays = {k: v if isinstance(v, pa.Array) else to_arrow(k, v) for k, v in columns.items()}
    batch = pa.RecordBatch.from_pydict(arrays)
    if stamp:
        batch = batch.replace_schema_metadata(dict(stamp))
    rel = f"{DATA_DIR}/{uuid.uuid4().hex}.arrow"
    local = fs.local_path(rel) if fs.is_local else fs.new_local_file(".arrow")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        with open(local, "wb") as f:
            sink = _CrcSink(f, sha256=key_of(fs) is not None)
            with pa.PythonFile(sink, mode="w") as out:
                with pa.ipc.new_file(out, batch.schema) as writer:
                    writer.write_batch(batch)
            f.flush()
            os.fsync(f.fileno())  # here, on the writer thread, overlapped with preparing the next shard
    except OSError as exc:  # e.g. ENOSPC: name the file and leave no partial file behind
        try:
            os.remove(local)
        except OSError:
            pass
        raise write_error(exc, "writing shard file", local) from exc
    if not fs.is_local:
        try:
            fs.write_file(rel, local)  # uploads, then the node cache adopts the file
        except BaseException:
            with contextlib.suppress(OSError):  # a failed upload leaves no staged file in the cache dir
                os.remove(local)
            raise
    else:
        getattr(fs, "_record", lambda rel: None)(rel)
    return FileEntry(path=rel, bytes=sink.size, crc32=sink.crc, columns=tuple(arrays),
                     block_bytes=sink.block_bytes, block_crc32c=sink.block_checksums(),
                     sha256=None if sink.sha is None else sink.sha.hexdigest())


def sync_files(fs: LakeFS, rels: list[str]) -> None:
    """Make newly written local files and their directories durable (no-op for remote stores)."""
    if not fs.is_local or not rels:
        return
    paths = [fs.local_path(rel) for rel in rels]
    for path in paths + sorted({os.path.dirname(p) for p in paths}):
        fsync_path(path)


def local_copy(fs: LakeFS, entry: FileEntry) -> str:
    """The local path of ``entry``'s file: for a remote lake the node cache's copy, downloaded and
    checked against the manifest's size and CRC32 first (`m2m.lake.cache`)."""
    if fs.is_local:
        return fs.local_path(entry.path)
    # open_local is RemoteFS-only; is_local False means fs is one
    with fs.open_local(entry.path, entry.bytes, entry.crc32, entry.sha256) as path:  # type: ignore[attr-defined]
        return str(path)


@contextlib.contextmanager
def leased_copy(fs: LakeFS, entry: FileEntry) -> Iterator[str]:
    """``local_copy``, held while the block runs: a remote lake's cached copy cannot be evicted (and
    deleted) under the caller, as it can once ``local_copy`` has returned."""
    if fs.is_local:
        yield fs.local_path(entry.path)
        return
    # open_local is RemoteFS-only; is_local False means fs is one
    with fs.open_local(entry.path, entry.bytes, entry.crc32, entry.sha256) as path:  # type: ignore[attr-defined]
        yield str(path)


def verify_file(fs: LakeFS, entry: FileEntry) -> None:
    """Raise `CorruptShardError` naming the file if its size or checksums differ from the manifest.

    Files with block checksums are checked block by block with crc32c (hardware-accelerated, and
    the error names the block; docs/tuning.md); older files by their whole-file CRC32.
    """
    with opened_shard(fs, entry) as f:
        f.check_size()
        f.check_digest(again=True)
        if entry.block_bytes is not None and entry.block_crc32c is not None:
            f.verify_all()
            return
        crc, buf = 0, np.empty(min(_CRC_CHUNK, entry.bytes), dtype=np.uint8)
        for lo in range(0, entry.bytes, len(buf) or 1):
            n = min(len(buf), entry.bytes - lo)
            f.read_into(lo, buf.data[:n])
            crc = zlib.crc32(buf.data[:n], crc)
        path = f.path
    if crc != entry.crc32:
        raise CorruptShardError(f"shard file {path} is corrupt: CRC32 {crc:#010x} != manifest {entry.crc32:#010x}")


@dataclass(frozen=True)
class ColumnExtent:
    """Where one fixed-width column's values lie in a shard file: row ``i`` is the ``row_bytes``
    bytes at ``offset + i * row_bytes`` (read them with `ShardFile`). ``dtype``: the numpy dtype
    of one value ("" when numpy has no same-width equivalent); ``list_size``: values per row of a
    fixed_size_list column (None for a plain column)."""

    path: str
    entry: FileEntry
    offset: int
    row_bytes: int
    rows: int
    dtype: str = ""
    list_size: int | None = None


@contextmanager
def opened_shard(fs: LakeFS, entry: FileEntry, cache_blocks: int = 0) -> Iterator[ShardFile]:
    """``with opened_shard(fs, entry) as f``: a `ShardFile` of ``entry``'s local file, opened (for a
    remote lake, while the node cache keeps its copy: an open descriptor outlives eviction)."""
    if fs.is_local:
        f = ShardFile(fs.local_path(entry.path), entry, cache_blocks=cache_blocks)
    else:
        # open_local is RemoteFS-only; is_local False means fs is one
        with fs.open_local(entry.path, entry.bytes, entry.crc32, entry.sha256) as path:  # type: ignore[attr-defined]
            f = ShardFile(str(path), entry, cache_blocks=cache_blocks)
            f._fileno()
    try:
        yield f
    finally:
        f.close()


_MAGIC = b"ARROW1"
_CONTINUATION = 0xFFFFFFFF


def _int32(buf: np.ndarray, at: int) -> int:
    return int.from_bytes(bytes(buf[at: at + 4]), "little", signed=True)


def _open_ipc(buf: pa.Buffer, path: str) -> pa.RecordBatch:
    reader = pa.ipc.open_file(pa.BufferReader(buf))
    if reader.num_record_batches != 1:
        raise CorruptShardError(f"shard file {path} holds {reader.num_record_batches} record batches, expected 1")
    return reader.get_batch(0)


def _header_batch(f: ShardFile) -> tuple[pa.RecordBatch, np.ndarray]:
    """The file's record batch over a sparse private copy holding only its Arrow metadata.

    The copy is a zero-filled buffer of the file's size (untouched pages cost no memory) into which
    the leading magic, the schema and record batch messages' metadata and the footer are read, so
    that Arrow resolves every column's buffers (offsets, lengths, null counts) without a byte of
    data being read. Column VALUES in it are zeros: callers read what they need into it first. A
    file laid out otherwise than m2m writes (a schema message then the batch) fails to parse here.
    """
    size = f.entry.bytes
    if size < 24:
        raise CorruptShardError(f"shard file {f.path} has {size} bytes: too short for an Arrow IPC file")
    shadow = np.zeros(size, dtype=np.uint8)
    view = shadow.data

    def fill(lo: int, hi: int) -> None:
        if not 0 <= lo <= hi <= size:
            raise CorruptShardError(f"shard file {f.path}: its Arrow metadata points outside the file "
                                    f"(bytes {lo}..{hi} of {size})")
        f.read_raw(lo, view[lo:hi])

    fill(0, 8)
    fill(size - 10, size)
    if bytes(shadow[:6]) != _MAGIC or bytes(shadow[size - 6:]) != _MAGIC:
        raise CorruptShardError(f"shard file {f.path} is not an Arrow IPC file (no ARROW1 magic at both ends)")
    footer = _int32(shadow, size - 10)
    fill(size - 10 - footer, size - 10)
    at = 8
    for _ in range(2):  # the schema message, then the record batch's (its body follows it)
        fill(at, at + 8)
        head, length = 8, _int32(shadow, at + 4)
        if _int32(shadow, at) != -1:  # the pre-1.0 framing: no continuation marker
            head, length = 4, _int32(shadow, at)
        fill(at + head, at + head + length)
        at += head + length
    try:
        return _open_ipc(pa.py_buffer(shadow), f.path), shadow
    except (pa.ArrowInvalid, pa.ArrowIOError, pa.ArrowNotImplementedError, ValueError) as exc:
        raise CorruptShardError(f"shard file {f.path} cannot be read: {exc}") from exc


def _fixed_width(arr: pa.Array) -> tuple[pa.Array, int | None] | None:
    """(values array, list size or None) of a fixed-width, null-free column; None for others."""
    size = None
    if pa.types.is_fixed_size_list(arr.type):
        if arr.null_count or arr.offset:
            return None
        size, arr = arr.type.list_size, arr.values
    if arr.null_count or not pa.types.is_primitive(arr.type) or pa.types.is_boolean(arr.type):
        return None
    if arr.buffers()[1] is None:
        return None
    return arr, size


def _numpy_dtype(typ: pa.DataType) -> str:
    try:
        dt = np.dtype(typ.to_pandas_dtype())
    except (NotImplementedError, TypeError):
        return ""
    return dt.str if dt.itemsize * 8 == typ.bit_width and dt.kind in "biuf" else ""


def _extents_of(f: ShardFile, batch: pa.RecordBatch, base: int, names: tuple[str, ...] | None
                ) -> dict[str, ColumnExtent]:
    out: dict[str, ColumnExtent] = {}
    size = f.entry.bytes
    for name in batch.schema.names if names is None else names:
        if name not in batch.schema.names:
            continue
        got = _fixed_width(batch.column(name))
        if got is None:
            continue
        arr, list_size = got
        item = arr.type.bit_width // 8
        offset = arr.buffers()[1].address - base + arr.offset * item
        if offset < 0 or offset + len(arr) * item > size:
            raise CorruptShardError(f"column {name!r} of {f.path} lies outside the file")
        width = list_size or 1
        out[name] = ColumnExtent(f.path, f.entry, int(offset), width * item, len(arr) // width,
                                 _numpy_dtype(arr.type), list_size)
    return out


def column_extents(fs: LakeFS, entry: FileEntry, names: tuple[str, ...] | None = None) -> dict[str, ColumnExtent]:
    """Byte extents of the fixed-width, null-free columns of a shard file (others are left out).

    Only the file's Arrow metadata is read (`read_header`'s few positional reads); no data.
    """
    with opened_shard(fs, entry) as f:
        f.check_size()
        batch, shadow = _header_batch(f)
        return _extents_of(f, batch, shadow.ctypes.data, names)


def read_header(path: str, entry: FileEntry, ids: str = "edges") -> pa.RecordBatch:
    """The record batch of the shard file at ``path`` with only its Arrow metadata and ids read.

    Row count, schema (with its metadata), column types and null counts are real; of the
    fixed-width ``id`` column, the first and last value (``ids="edges"``) or every value
    (``ids="all"``) are read. EVERY OTHER VALUE READS AS ZERO: use `open_shard_file` for data.
    Reads are positional and unchecked (the footer checks' input); a short read or unparsable
    metadata is `CorruptShardError` naming the file.
    """
    if ids not in ("edges", "all"):
        raise ConfigError(f"ids must be 'edges' or 'all', got {ids!r}")
    with ShardFile(path, entry) as f:
        f.check_size()
        batch, shadow = _header_batch(f)
        if "id" in batch.schema.names:
            ext = _extents_of(f, batch, shadow.ctypes.data, ("id",)).get("id")
            if ext is not None and ext.rows:
                view, lo, n = shadow.data, ext.offset, ext.rows * ext.row_bytes
                spans = [(lo, lo + n)] if ids == "all" or n <= 2 * ext.row_bytes else \
                    [(lo, lo + ext.row_bytes), (lo + n - ext.row_bytes, lo + n)]
                for a, b in spans:
                    f.read_raw(a, view[a:b])
        return batch


def read_column(f: ShardFile, ext: ColumnExtent) -> np.ndarray:
    """Column ``ext`` of the open file ``f`` as a fresh numpy array ([rows] or [rows, list_size]),
    every block read checked against the manifest's block checksums (when the file has them)."""
    if not ext.dtype:
        raise ConfigError(f"column at {ext.path}:{ext.offset} has no numpy dtype")
    shape = (ext.rows,) if ext.list_size is None else (ext.rows, ext.list_size)
    out = np.empty(shape, dtype=np.dtype(ext.dtype))
    f.read_into(ext.offset, out.reshape(-1).view(np.uint8).data)
    return out


class BlockCache:
    """A small LRU of checked blocks, shared by the `ShardFile`s of one reader (bounded in blocks)."""

    def __init__(self, max_blocks: int = 8) -> None:
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = ForkSafeLock()
        self.hits = 0

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        with self._lock:
            buf = self._blocks.get(key)
            if buf is not None:
                self._blocks.move_to_end(key)
                self.hits += 1
            return buf

    def put(self, key: tuple[str, int], buf: np.ndarray) -> None:
        if self.max_blocks <= 0:
            return
        with self._lock:
            self._blocks[key] = buf
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)


MAX_OPEN_FILES = 128
"""Descriptors the readers of a process (`shared_open_files`) keep open at most: a stream or a random reader of
a lake of many shards held one per shard it had touched, until ``Too many open files`` (a 300-shard lake under a
soft limit of 256, 2026-12-08); each DataLoader worker process has its own."""


class OpenFiles:
    """The `ShardFile`s that hold an open descriptor (those of every reader of the process, for
    `shared_open_files`), at most ``limit`` of them: using one more closes the least recently used file
    that no read is using (it reopens on its next read)."""

    def __init__(self, limit: int = MAX_OPEN_FILES) -> None:
        self.limit = max(1, int(limit))
        self._open: OrderedDict[int, ShardFile] = OrderedDict()
        # reentrant: a garbage collection inside `used` may run a finalizer that closes files of this reader
        # (`ShardFile.close` -> `forget`) on the same thread (a plain lock deadlocked there, found in review)
        self._lock = ForkSafeLock(reentrant=True)
        self.closed = 0

    def used(self, f: "ShardFile") -> None:
        with self._lock:
            self._open[id(f)] = f
            self._open.move_to_end(id(f))
            if len(self._open) <= self.limit:
                return
            for key, g in list(self._open.items()):
                if len(self._open) <= self.limit:
                    break
                if g is not f and g._close_if_idle():
                    self._open.pop(key, None)
                    self.closed += 1

    def forget(self, f: "ShardFile") -> None:
        with self._lock:
            self._open.pop(id(f), None)

    def __len__(self) -> int:
        return len(self._open)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # a copy (a spawned worker's) starts with no file open: descriptors never cross processes; the
        # process's shared limiter is the receiving process's shared one
        return (shared_open_files, ()) if self is _SHARED[0] else (OpenFiles, (self.limit,))


_SHARED: list[OpenFiles | None] = [None]
_SHARED_LOCK = ForkSafeLock()


def shared_open_files() -> OpenFiles:
    """The `OpenFiles` the readers of this process share (created on first use): the limit holds for the
    process, however many readers (a training and a validation loader, random access beside a stream:
    each with its own 128 ran out of a limit of 256 open files, 2026-12-08)."""
    with _SHARED_LOCK:
        shared = _SHARED[0]
        if shared is None:
            shared = _SHARED[0] = OpenFiles()
        return shared


def open_regular(path: str, follow_links: bool = True) -> int:
    """A read-only descriptor of the regular file at ``path``; `CorruptShardError` naming what it is
    otherwise (FileNotFoundError as ``os.open`` raises it). Opened non-blocking: opening a FIFO planted
    under a shard's name blocked until a writer came (open_lake, verify, vacuum and repair hung); a
    regular file reads as without the flag. ``follow_links=False``: a symlink is refused by the open."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a special file"
        raise CorruptShardError(f"shard file {path} is {what}, not a regular file")
    return fd


def _missing(path: str) -> str:
    """Why the shard file ``path`` may be missing, in one line."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # <lake>/_data/<file>: the lake's folder
    if not os.path.isdir(folder):
        return (f"shard file {path} is missing: its folder {folder} is gone (moved or removed since the lake "
                "was opened; a temporary lake is removed when it is closed: keep it open while a loader reads it)")
    return (f"shard file {path} is missing (if `vacuum` or `compact` + `vacuum` ran since this reader opened its "
            f"version, that version's files are gone: reopen the lake; else run `m2m verify`)")


_DIGEST_CHUNK = 1 << 20
# (device, inode, size, mtime, SHA-256) of the files this process has hashed: each is read whole once
_DIGESTS_SEEN: set[tuple[int, int, int, int, str]] = set()


def _check_digest(fd: int, path: str, entry: FileEntry, again: bool = False) -> bool:
    """`CorruptShardError` unless the open file ``fd`` hashes to ``entry.sha256``.

    Returns whether the file was read (False: this process had checked it). A signed lake's files are
    bound to its signed manifest by this digest, not by their CRCs alone (a
    CRC is linear: a writer without the key changed a label and kept every CRC, observed). The whole file
    is read once per process (fork children inherit what was checked); a later change in place, within
    the same second and size, is what the block CRCs still catch (accidents), not an attacker racing the
    reader (docs/format.md, "Signed lakes").
    """
    st = os.fstat(fd)
    want = entry.sha256
    assert want is not None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, want)
    if not again and key in _DIGESTS_SEEN:
        return False
    at, got_hex = fd_sha256(fd, min(_DIGEST_CHUNK, st.st_size))
    if at != entry.bytes or got_hex != want:
        raise CorruptShardError(f"shard file {path} is not the file the signed manifest names: {at} bytes with "
                                f"SHA-256 {got_hex[:16]}..., the manifest says {entry.bytes} bytes, {want[:16]}... "
                                "(changed by someone without the lake's key, or damaged)")
    _DIGESTS_SEEN.add(key)
    return True


class ShardFile:
    """Positional reads of one shard file, each block read from disk checked against the manifest.

    `read_into` reads straight into the caller's buffer the blocks a range covers whole, and
    through a small LRU cache of checked blocks (`BlockCache`, shared by a reader's files) the blocks it covers in part (so neighbouring
    small reads, such as the label rows of consecutive row blocks, read each block once). A file
    shorter than the manifest says, or a block whose crc32c differs, raises `CorruptShardError`
    naming the file. Files without block checksums (written before they existed) are only
    checked for length here; their whole-file CRC32 is checked once when a snapshot opens them.
    Thread-safe: reads are positional, the cache is guarded by a lock.
    """

    def __init__(self, path: str, entry: FileEntry, cache_blocks: int = 8, cache: BlockCache | None = None,
                 open_files: OpenFiles | None = None) -> None:
        self.path = path
        self.entry = entry
        self.block_bytes = entry.block_bytes if entry.block_crc32c is not None else None
        self._cache = cache if cache is not None else BlockCache(cache_blocks)
        self._open_files = open_files
        self._lock = ForkSafeLock(reentrant=True)   # (a finalizer may close this file while the thread holds it)
        self._fd: int | None = None
        self._users = 0          # reads using the descriptor now (`OpenFiles` closes only an idle file)
        self._closing = False    # close() came while reads used it: the last of them closes it
        self._identity: tuple[int, ...] | None = None   # the file first opened (a reopen must find it again)
        self._digest_read = False  # its first open read the whole file for its SHA-256
        self.bytes_read = 0
        self.bytes_checked = 0

    def __getstate__(self) -> dict[str, Any]:
        # a descriptor number means nothing in another process, and a copy that closed it (when
        # collected) closed the original's: its next read got whatever file took the number (2026-12-08)
        state = dict(self.__dict__)
        # (the identity too: another host mounting the path sees another st_dev, and a copy checks the
        # digest of a signed lake's file once in its own process, as any reader does)
        state.update(_fd=None, _users=0, _closing=False, _identity=None, _digest_read=False)
        return state

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptor (a later read reopens it); while reads use it, the last of them closes it
        (closing it under a read made that read fail, or read whichever file took the number next)."""
        with self._lock:
            fd = self._fd
            if fd is None:
                return
            if self._users:
                self._closing = True
                fd = None
            else:
                self._fd = None
        if fd is not None:
            os.close(fd)
        if self._open_files is not None:
            self._open_files.forget(self)

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # (no limiter to tell: it holds every file it counts; no read can be using an unreachable file;
        # os.close bound at definition: at interpreter exit `os` may already be None when this runs)
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            _close(fd)

    def _close_if_idle(self) -> bool:
        """Close the descriptor unless a read is using it (`OpenFiles`); True if it is closed now."""
        with self._lock:
            if self._users:
                return False
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        return True

    @contextmanager
    def _fileno_held(self) -> Iterator[int]:
        """The open descriptor, kept open (`OpenFiles` closes only idle files) while the block runs."""
        with self._lock:
            if self._fd is None:
                self._fd = self._open()
            self._users += 1
            fd = self._fd
        try:
            if self._open_files is not None:
                self._open_files.used(self)
            yield fd
        finally:
            closing = None
            with self._lock:
                self._users -= 1
                if not self._users and self._closing:
                    closing, self._fd, self._closing = self._fd, None, False
            if closing is not None:
                os.close(closing)

    def _fileno(self) -> int:
        """The descriptor (opened if need be) for a caller that keeps the file open itself (`opened_shard`)."""
        with self._fileno_held() as fd:
            return fd

    def _open(self) -> int:
        try:
            fd = open_regular(self.path)
        except FileNotFoundError as exc:
            raise CorruptShardError(_missing(self.path)) from exc
        try:
            st = os.fstat(fd)
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if self._identity is not None and identity != self._identity:
                # a reopen (after `OpenFiles` closed it) found another file at the path
                raise CorruptShardError(f"shard file {self.path} changed on disk while the lake was read: it was "
                                        "replaced (a shard file is never rewritten)")
            if self.entry.sha256 is not None and self._identity is None:
                self._digest_read = _check_digest(fd, self.path, self.entry)
            self._identity = identity
        except BaseException:
            os.close(fd)
            raise
        return fd

    def check_digest(self, again: bool = False) -> None:
        """`CorruptShardError` unless the file's SHA-256 is the manifest's (signed lakes' files; others have
        none). Checked once per process and file at its first open; ``again`` reads the file again."""
        with self._fileno_held() as fd:
            if again and self.entry.sha256 is not None and not self._digest_read:  # (not twice for one open)
                _check_digest(fd, self.path, self.entry, again=True)

    def advise(self, start: int, length: int) -> None:
        """Ask the kernel to start reading ``[start, start + length)`` (a hint)."""
        if length > 0 and hasattr(os, "posix_fadvise"):
            with self._fileno_held() as fd:
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)

    def _pread(self, start: int, dst: memoryview) -> None:
        with self._fileno_held() as fd:
            done = 0
            while done < len(dst):
                got = os.preadv(fd, [dst[done:]], start + done)
                if got == 0:
                    now = os.fstat(fd).st_size
                    raise CorruptShardError(
                        f"shard file {self.path} was cut short while being read: it has {now} bytes, the manifest "
                        f"says {self.entry.bytes} (reading bytes {start + done}..{start + len(dst)})")
                done += got
        self.bytes_read += len(dst)

    def read_raw(self, start: int, dst: memoryview) -> None:
        """Fill ``dst`` from ``start`` with positional reads and no block check (metadata reads)."""
        if start < 0 or start + len(dst) > self.entry.bytes:
            raise CorruptShardError(f"shard file {self.path}: bytes {start}..{start + len(dst)} are outside its "
                                    f"{self.entry.bytes} bytes")
        self._pread(start, dst)

    def check_size(self) -> None:
        """`CorruptShardError` unless the open file has the manifest's size."""
        with self._fileno_held() as fd:
            now = os.fstat(fd).st_size
        if now != self.entry.bytes:
            raise CorruptShardError(f"shard file {self.path} has {now} bytes, the manifest says {self.entry.bytes}")

    def _check(self, block: int, data: memoryview) -> None:
        assert self.entry.block_crc32c is not None
        got = crc32c.crc32c(data)
        self.bytes_checked += len(data)
        want = self.entry.block_crc32c[block]
        if got != want:
            lo = block * int(self.block_bytes or 0)
            raise CorruptShardError(
                f"shard file {self.path} changed on disk: block {block} (bytes {lo}..{lo + len(data)}) has crc32c "
                f"{got:#010x}, the manifest says {want:#010x}")

    def _block_span(self, block: int) -> tuple[int, int]:
        assert self.block_bytes is not None
        lo = block * self.block_bytes
        return lo, min(lo + self.block_bytes, self.entry.bytes)

    def _block(self, block: int) -> np.ndarray:
        """One checked block (from the cache, or read and checked now)."""
        buf = self._cache.get((self.path, block))
        if buf is not None:
            return buf
        lo, hi = self._block_span(block)
        buf = np.empty(hi - lo, dtype=np.uint8)
        view = buf.data
        self._pread(lo, view)
        self._check(block, view)
        self._cache.put((self.path, block), buf)
        return buf

    def read_into(self, start: int, dst: memoryview) -> int:
        """Fill ``dst`` (a writable, contiguous byte buffer) with the file's bytes from ``start``; returns bytes."""
        dst = dst.cast("B") if dst.format != "B" else dst
        n = len(dst)
        end = start + n
        if start < 0 or end > self.entry.bytes:
            raise CorruptShardError(f"shard file {self.path}: bytes {start}..{end} are outside its "
                                    f"{self.entry.bytes} bytes")
        if n == 0:
            return 0
        if self.block_bytes is None:
            self._pread(start, dst)
            return n
        bb = self.block_bytes
        first, last = start // bb, (end - 1) // bb
        whole_lo = first if start == first * bb else first + 1
        whole_hi = last if end == self._block_span(last)[1] else last - 1  # inclusive
        if whole_lo <= whole_hi:  # blocks covered whole: read into dst, check there
            a = whole_lo * bb - start
            b = self._block_span(whole_hi)[1] - start
            self._pread(start + a, dst[a:b])
            for k in range(whole_lo, whole_hi + 1):
                lo, hi = self._block_span(k)
                self._check(k, dst[lo - start: hi - start])
        for k in {first, last}:  # blocks covered in part: through the cache
            if whole_lo <= k <= whole_hi:
                continue
            lo, hi = self._block_span(k)
            a, b = max(lo, start), min(hi, end)
            dst[a - start: b - start] = self._block(k).data[a - lo: b - lo]
        return n

    def verify_all(self, chunk_blocks: int = 64) -> None:
        """Read and check every block of the file (a whole-file scan)."""
        if self.block_bytes is None:
            raise ConfigError(f"shard file {self.path} has no block checksums")
        step = self.block_bytes * chunk_blocks
        buf = np.empty(min(step, self.entry.bytes), dtype=np.uint8)
        for lo in range(0, self.entry.bytes, step):
            n = min(step, self.entry.bytes - lo)
            self.read_into(lo, buf.data[:n])
        self.check_size()


def open_shard_file(fs: LakeFS, entry: FileEntry, verify: bool = True) -> pa.RecordBatch:
    """Read a whole shard file into a private buffer and return its single record batch (zero-copy
    views of that buffer, which no truncation of the file can take away).

    Files with block checksums are checked block by block in the same pass (always: it costs
    little next to the read); older files by their whole-file CRC32 when ``verify``.
    """
    with opened_shard(fs, entry) as f:
        buf = np.empty(entry.bytes, dtype=np.uint8)
        f.read_into(0, buf.data)
        f.check_size()
        path = f.path
    if verify and entry.block_crc32c is None:
        crc = zlib.crc32(buf.data)
        if crc != entry.crc32:
            raise CorruptShardError(f"shard file {path} is corrupt: CRC32 {crc:#010x} != manifest {entry.crc32:#010x}")
    try:
        batch = _open_ipc(pa.py_buffer(buf), path)
        missing = set(entry.columns) - set(batch.schema.names)
        if missing:
            raise CorruptShardError(f"shard file {path} lacks columns {sorted(missing)}")
        batch.validate(full=False)
    except (pa.ArrowInvalid, pa.ArrowIOError, pa.ArrowNotImplementedError, ValueError) as exc:
        raise CorruptShardError(f"shard file {path} cannot be read: {exc}") from exc
    return batch


def column_to_numpy(array: pa.Array) -> np.ndarray:
    """A numpy view of an Arrow column: fixed_size_list -> [rows, k]; strings -> object array."""
    if pa.types.is_fixed_size_list(array.type):
        width = array.type.list_size
        flat = array.flatten()
        # booleans are bit-packed in Arrow: a (small) copy
        return flat.to_numpy(zero_copy_only=not pa.types.is_boolean(flat.type)).reshape(-1, width)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type) or pa.types.is_boolean(array.type):
        return array.to_numpy(zero_copy_only=False)  # booleans are bit-packed in Arrow: a (small) copy
    if pa.types.is_date(array.type):
        return array.to_numpy(zero_copy_only=False)  # int32 days / int64 ms -> datetime64: a (small) copy
    return array.to_numpy(zero_copy_only=array.null_count == 0)
