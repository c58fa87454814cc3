"""The node-cache copies of a remote lake's shard files that one reader holds open.

Shared by the stream's cold reads (`m2m.stream.stages.cold.ColdReader`) and random access
(`m2m.lake.access.RowReader`): a copy the node cache evicts is downloaded again when next read,
never reported missing, and a reader keeps at most one idle copy open, so the disk a reader holds
beyond the cache's budget is one shard per thread reading.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable, TypeVar

from m2m.errors import CorruptShardError
from m2m.lake.shard import BlockCache, ColumnExtent, ShardFile

__all__ = ["IDLE_REMOTE_FILES", "RemoteFiles"]

T = TypeVar("T")

IDLE_REMOTE_FILES = 1  # cached shard files a remote reader keeps open between reads


def _unlinked(file: ShardFile) -> bool:
    """Whether ``file``'s open copy has been removed from the node cache (its last link gone)."""
    fd = file._fd
    if fd is None:
        return False
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return True


class _Handle:
    __slots__ = ("file", "refs", "stale")

    def __init__(self, file: ShardFile) -> None:
        self.file = file
        self.refs = 0
        self.stale = False


class RemoteFiles:
    """The node-cache copies of a remote lake's shard files that one reader has open.

    A file is opened only through the node cache (`m2m.lake.fs.FsspecFS.open_local`: downloaded if
    needed, and existing while it is opened), never again by its path, so a file the cache evicted is
    downloaded again rather than reported missing. Each read holds its file (a reference count);
    once no read holds it, the file stays open only while it is among the `IDLE_REMOTE_FILES` most
    recently used and still in the cache: an idle file the cache of this process evicts is closed at
    once (`evicted`), one another process evicts at this reader's next read (`_sweep`), so the disk
    a reader keeps beyond the cache's budget is one shard per thread reading at that moment.

    A copy that fails a block check is dropped from the cache and downloaded once more, and the
    read retried; a second failure raises `CorruptShardError` naming the remote object.
    """

    def __init__(self, fs: Any, cache: BlockCache, idle: int = IDLE_REMOTE_FILES) -> None:
        self.fs = fs
        self._cache = cache
        self.idle = int(idle)
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Handle] = OrderedDict()
        self.closed_checked = 0  # bytes checked by files closed since
        self.reopens = 0
        cache = getattr(self.fs, "cache", None)
        if cache is not None:
            cache.on_evict(self)

    def _after_fork(self) -> None:
        if self._pid != os.getpid():  # a forked worker: its own files (the inherited fds are copies)
            for h in list(getattr(self, "_open", {}).values()):
                h.file.close()
            self._init_process_state()

    def evicted(self, path: str) -> None:
        """The node cache of this process just evicted ``path``: close it now if no read holds it
        (evictions by other processes are noticed at this reader's next read, `_sweep`)."""
        with self._lock:
            if self._pid != os.getpid():
                return
            h = self._open.get(path)
            if h is not None and h.refs == 0:
                del self._open[path]
                self._close(h)

    def _acquire(self, ext: ColumnExtent) -> _Handle:
        self._after_fork()
        with self._lock:
            h = self._open.get(ext.path)
            if h is not None:
                h.refs += 1
                self._open.move_to_end(ext.path)
                return h
        entry = ext.entry
        f = ShardFile(ext.path, entry, cache=self._cache)
        with self.fs.open_local(entry.path, entry.bytes, entry.crc32, entry.sha256) as local:
            if local != ext.path:
                raise CorruptShardError(f"the node cache gave {local} for {ext.path}")
            f._fileno()  # opened while the cache keeps the file: an open file outlives eviction
        with self._lock:
            self.reopens += 1
            h = self._open.get(ext.path)
            if h is None:
                h = self._open[ext.path] = _Handle(f)
            else:  # another thread opened it meanwhile: use theirs
                f.close()
            h.refs += 1
            self._open.move_to_end(ext.path)
            self._sweep()  # another process may have evicted our idle file while this one downloaded
            return h

    def _release(self, path: str, h: _Handle) -> None:
        with self._lock:
            h.refs -= 1
            if h.stale and h.refs == 0:
                self._close(h)
            self._sweep()

    def _sweep(self) -> None:
        """Close idle files beyond the `idle` most recent, and idle files the node cache has evicted
        (unlinked: kept open, their disk would stay in use past the budget). Lock held."""
        idle = [(p, x) for p, x in self._open.items() if x.refs == 0]
        surplus = max(0, len(idle) - self.idle)  # the oldest idle files beyond the `idle` kept
        for i, (p, x) in enumerate(idle):
            if i < surplus or _unlinked(x.file):
                del self._open[p]
                self._close(x)

    def _close(self, h: _Handle) -> None:
        self.closed_checked += h.file.bytes_checked
        h.file.close()

    def _drop(self, ext: ColumnExtent, h: _Handle) -> None:
        """``h``'s copy failed a check: no new read uses it, and the cache downloads it again."""
        inode = None
        fd = h.file._fd
        if fd is not None:
            inode = os.fstat(fd).st_ino
        with self._lock:
            if self._open.get(ext.path) is h:
                del self._open[ext.path]
            h.stale = True
        self.fs.cache.invalidate(ext.entry.path, inode)

    def run(self, ext: ColumnExtent, fn: Callable[[ShardFile], T]) -> T:
        """``fn(file)`` on ``ext``'s file, held open while it runs (``fn`` must be safe to repeat)."""
        h = self._acquire(ext)
        try:
            return fn(h.file)
        except CorruptShardError:
            self._drop(ext, h)
        finally:
            self._release(ext.path, h)
        h = self._acquire(ext)
        try:
            return fn(h.file)
        except CorruptShardError as exc:
            raise CorruptShardError(f"shard object {self.fs.url}/{ext.entry.path} failed its checks again after a "
                                    f"fresh download: {exc}") from exc
        finally:
            self._release(ext.path, h)

    def advise(self, ext: ColumnExtent, start: int, length: int) -> None:
        """Read-ahead hint for a file this reader has open now (others are skipped: not downloaded yet)."""
        with self._lock:
            h = self._open.get(ext.path) if self._pid == os.getpid() else None
            if h is None:
                return
            h.refs += 1
        try:
            h.file.advise(start, length)
        finally:
            self._release(ext.path, h)

    def bytes_checked(self) -> int:
        with self._lock:
            return self.closed_checked + sum(h.file.bytes_checked for h in self._open.values())

    def close(self) -> None:
        """Close every idle file (files being read close when their reads end)."""
        with self._lock:
            for p, h in list(self._open.items()):
                if h.refs == 0:
                    del self._open[p]
                    self._close(h)
                else:
                    h.stale = True
                    del self._open[p]

    def __getstate__(self) -> dict[str, Any]:
        return {"fs": self.fs, "_cache": self._cache, "idle": self.idle}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()
