"""The node-local disk cache of a remote lake's shard files: the cold (SSD) tier under warm RAM.

Every process of a node that opens remote lakes with the same ``cache_dir`` shares one cache:

* **byte budget** — the files in the cache (finished shards plus downloads in flight, counted at
  their final size from the moment they start) never exceed ``cache_bytes``, except that a single
  download may go over it when nothing else is in flight (a shard larger than the budget, or every
  other file briefly in use): at most ``cache_bytes`` + one shard.
* **LRU eviction by shard file** — a file's modification time is its last use (set on every open by
  any process); the least recently used files go first. A file being opened (shared lock held) is
  skipped. Evicting unlinks the file: a process that has it open or mapped keeps reading it (POSIX
  unlink semantics), and the space comes back when that process closes it. A stream's reader holds
  a file only while reading it plus its last one, which it closes once evicted (told by `on_evict`
  in its own process, by the link count at its next read otherwise;
  `m2m.lake.remote_files.RemoteFiles`), so disk in use, deleted-but-open files included, stays
  within ``cache_bytes`` + one shard per thread reading; a
  remote snapshot keeps at most ``cache_bytes`` of shards mapped (`m2m.lake.reader.Snapshot`).
* **damaged copies** — a copy of the wrong size is dropped when opened and downloaded again;
  `invalidate` drops one that failed a checksum (the lake checks a copy it did not download once per
  process, and readers check every block they read).
* **store failures** — a download that ends in `ObjectStoreError` after the lake's retries is
  noted in the lock folder: for ``failure_hold`` seconds, reads of this node that wait for a
  download or need a new one give up with it, and prefetches are skipped.
* **atomic, shared downloads** — a download holds the file's exclusive lock and writes
  ``<name>.<size>.<uuid>.part`` (the size in the name is the reservation other processes count),
  verifies its size and CRC32 against the manifest, and renames it into place. A
  second process (or thread) asking for the same file blocks on that lock and then reuses the file.
  Parts left by a killed process are noticed (their lock is free) and deleted.
* **prefetch** — ``prefetch`` downloads the next shards of the epoch's order on a small background
  pool, at most ``prefetch_shards`` queued at once.
* **names** — cached files are ``<sha256(url, path)>.shard`` directly in ``cache_dir``: nothing
  derived from the object's name reaches the local path, and every path is checked to lie inside it.

Why not fsspec's ``filecache``/``blockcache``: its ``CachingFileSystem`` keeps one JSON index per
cache directory that it rewrites without a cross-process lock (concurrent processes lose entries or
read half-written indexes), has no byte budget (only age-based expiry), and does not verify a
checksum we know from the manifest. We keep fsspec for the transfer itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol

from m2m.errors import (
    LOCAL_DISK_ERRNOS,
    CacheTimeoutError,
    ConfigError,
    CorruptShardError,
    LakeClosedError,
    ObjectStoreError,
    WriteFailedError,
)
from m2m.lake.tempdirs import CACHE_PREFIX, create_temporary, remove_with

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 64 << 30      # cap of the default budget; the default is also <= half the free disk
LOCK_TIMEOUT_S = 600.0              # longest wait for another process's download or the cache lock
PREFETCH_SHARDS = 4
PREFETCH_THREADS = 2
SHARD_SUFFIX = ".shard"
PART_SUFFIX = ".part"
STAGED_PREFIX = ".tmp-"               # `new_local_file`: a shard a writer is about to upload
STAGED_MAX_AGE_S = 6 * 3600.0
_POLL_S = 0.01
# the names this cache gives its files: a scan evicts or removes only these (a user's file in cache_dir
# that merely ended in .shard, or began with .tmp-, was deleted: observed)
_SHARD_NAME = re.compile(r"[0-9a-f]{40}\.shard")
_STAGED_NAME = re.compile(r"\.tmp-[0-9a-f]{32}(\.[A-Za-z0-9]+)?")
_PART_OWNER = re.compile(r"[0-9a-f]{40}")
FAILURE_HOLD_S = 10.0


class EvictionListener(Protocol):
    """A reader of cached files that closes an evicted one it holds idle."""

    def evicted(self, path: str) -> None: ...


def default_budget(directory: str) -> int:
    """``min(DEFAULT_CACHE_BYTES, half the free space of the disk holding directory)``."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return DEFAULT_CACHE_BYTES
    return int(min(DEFAULT_CACHE_BYTES, max(free // 2, 1)))  # (a floor of 1 MiB exceeded a smaller free space)


def _free(directory: str) -> int:
    try:
        return int(shutil.disk_usage(directory).free)
    except OSError:
        return 0


def _inside(base: str, path: str) -> str:
    """``path`` if it resolves inside ``base``; `CorruptShardError` otherwise (no cached path may escape;
    names are hashes, so only a symlink planted in the cache directory could trigger it)."""
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) != base or real == base:
        raise CorruptShardError(f"cache path {path!r} leaves the shard cache {base!r}")
    return real


class _FileLock:
    """An flock(2) on a lock file with a bounded wait. One open file description per holder, so two
    threads of one process exclude each other exactly as two processes do."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    def acquire(self, shared: bool, timeout: float, what: str, check: Callable[[], None] | None = None) -> None:
        """Take the lock, waiting at most ``timeout``; ``check()`` runs while waiting (it may raise)."""
        fd = self._open()
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            else:
                if self._current(fd):
                    self._fd = fd
                    return
                # removed (`remove`) while we waited: lock the file now at the path (a failing reopen has
                # nothing of ours open: the handler above closed the old number again, found in review)
                fd = self._reopen(fd)
                continue
            if time.monotonic() >= deadline:
                os.close(fd)
                raise CacheTimeoutError(f"waited {timeout:.0f} s for {what} (lock {self.path})")
            if check is not None:
                try:
                    check()
                except BaseException:
                    os.close(fd)
                    raise
            time.sleep(_POLL_S)

    def try_acquire(self) -> bool:
        """Exclusive lock without waiting; False if anyone holds it."""
        fd = self._open()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            if self._current(fd):
                self._fd = fd
                return True
            fd = self._reopen(fd)

    def _current(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at the lock's path (a holder that `remove`d it unlinked it
        before letting go: a lock on the old file excludes nobody who opens the path now)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (st.st_ino, st.st_dev) == (held.st_ino, held.st_dev)

    def _reopen(self, fd: int) -> int:
        """Let go of ``fd`` and open the path again (if that raises, nothing is left open)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return self._open()

    def remove(self) -> None:
        """Unlink the lock file, then release it: only while holding it exclusively (`acquire` and
        `try_acquire` of anyone who waited on it then lock a new file at the path)."""
        if self._fd >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.release()

    def _open(self) -> int:
        # never through a symlink: one planted at a lock's name made the cache create its target,
        # outside the cache (observed)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptShardError(f"cache lock {self.path} is a symlink: the shard cache does not follow "
                                        "symlinks (remove it)") from None
            raise

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class ShardCache:
    """A byte-budgeted, LRU, multi-process disk cache of one remote lake's files.

    ``fs`` is the fsspec filesystem, ``root`` the lake's path in it and ``url`` its URL (part of every
    cached name, so lakes can share a cache directory and its budget). ``cache_dir=None`` makes a
    private directory removed by `close`; a given ``cache_dir`` is shared and kept.
    """

    def __init__(self, fs: Any, root: str, url: str, cache_dir: str | os.PathLike[str] | None = None,
                 cache_bytes: int | None = None, prefetch_shards: int = PREFETCH_SHARDS,
                 lock_timeout: float = LOCK_TIMEOUT_S, download: Callable[[str, str], None] | None = None,
                 size: Callable[[str], int] | None = None) -> None:
        self.fs = fs
        self._get = download  # (rel, local path): the lake's own download (its retries/timeouts), or get_file
        self._size = size     # rel -> bytes: the lake's own request, or fs.size
        self.root = root.rstrip("/")
        self.url = url
        self.private = cache_dir is None
        # a private cache has an owner file: the next one swept it if its process ended without running
        # the finalizer below (a forked DataLoader worker that opened a lake ends through os._exit)
        base = create_temporary(CACHE_PREFIX) if cache_dir is None else os.path.expanduser(cache_dir)
        if not str(base).strip():
            raise ConfigError(f"cache_dir {cache_dir!r} names no folder: name a folder for the shard cache "
                              "(M2M_CACHE_DIR), or None for a private one")
        if os.path.lexists(base) and not os.path.isdir(base):  # (it said only "[Errno 17] File exists: ...")
            what = "a symbolic link to nothing" if os.path.islink(base) else "not a folder"
            raise ConfigError(f"cache_dir {base!r} is {what}: name a folder for the shard cache (M2M_CACHE_DIR)")
        os.makedirs(base, exist_ok=True)
        self.dir = os.path.realpath(base)
        self._locks = os.path.join(self.dir, ".locks")
        if not os.path.islink(self._locks):  # (a dangling link made makedirs raise FileExistsError)
            os.makedirs(self._locks, exist_ok=True)
        if os.path.islink(self._locks):  # its lock files and notes would be made wherever it points
            raise CorruptShardError(f"{self._locks} is a symlink: the shard cache keeps its locks inside "
                                    f"{self.dir} only (remove it)")
        self.budget = default_budget(self.dir) if cache_bytes is None else int(cache_bytes)
        self.prefetch_shards = int(prefetch_shards)
        #: seconds after a download from the store ended in `ObjectStoreError` (in any process of the
        #: node) during which reads that need a download fail at once with it (the lake sets its io_timeout)
        self.failure_hold = FAILURE_HOLD_S
        self.lock_timeout = float(lock_timeout)
        self._owner = os.getpid()
        self._url_key = hashlib.sha256(url.encode()).hexdigest()
        # a private cache also goes when the last user of this object is collected or at exit, not only
        # on close(): every unclosed handle left a copy of each shard it read in the temp dir (observed)
        self._remove_dir = remove_with(self, self.dir) if self.private else None
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._pool: ThreadPoolExecutor | None = None
        self._queued: dict[str, Future[Any]] = {}
        self._failed: dict[str, tuple[float, BaseException]] = {}  # prefetches that failed: when, why
        self._mutex = threading.Lock()
        self.fetches: Counter[str] = Counter()   # downloads by this process, per lake-relative path
        self.fetch_bytes = 0
        self.hits = 0
        self.evictions = 0
        self.invalidations = 0
        # readers of this process told when a file is evicted (they close it if idle, freeing its disk)
        self._listeners: weakref.WeakSet[EvictionListener] = weakref.WeakSet()

    def on_evict(self, listener: EvictionListener) -> None:
        """Call ``listener.evicted(path)`` when this process evicts ``path`` (held weakly)."""
        self._after_fork()
        with self._mutex:
            self._listeners.add(listener)

    def _after_fork(self) -> None:
        """A forked child (a DataLoader worker) starts with its own pool, locks and counters: the
        parent's threads did not come along, and a lock one of them held would stay held."""
        if self._pid != os.getpid():
            self._init_process_state()

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_pool", "_queued", "_failed", "_mutex", "fetches", "fetch_bytes", "hits", "evictions",
                              "invalidations", "_pid", "_listeners", "_remove_dir")}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    # ------------------------------------------------------------------ names
    def name(self, rel: str) -> str:
        """The cached file name of lake-relative ``rel``: a hash, never the object's own name."""
        return hashlib.sha256(f"{self._url_key}\0{rel}".encode()).hexdigest()[:40]

    def path(self, rel: str) -> str:
        """Where ``rel`` is (or would be) cached; always strictly inside the cache directory."""
        return _inside(self.dir, os.path.join(self.dir, self.name(rel) + SHARD_SUFFIX))

    def _lock(self, name: str) -> _FileLock:
        if not os.path.isdir(self._locks):   # (the lock file's open failed with a bare FileNotFoundError)
            why = ("a lake's private shard cache is removed by lake.close(): keep the lake open while a loader "
                   "reads it, or give cache_dir= for a cache that outlives the handle") if self.private else \
                "the shared cache directory was removed while this lake used it"
            raise LakeClosedError(f"shard cache {self.dir} is gone ({why})")
        return _FileLock(_inside(self.dir, os.path.join(self._locks, name + ".lock")))

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _named(self, rel: str) -> str:
        """``rel``'s URL, as messages name it."""
        return f"{self.url}/{rel}"

    # ------------------------------------------------------------------ reading
    @contextmanager
    def open(self, rel: str, size: int | None = None, crc32: int | None = None) -> Iterator[str]:
        """The local path of ``rel``, downloaded (and verified) if needed, protected from eviction
        while the ``with`` block runs (map or open it there; a mapping outlives eviction)."""
        self._after_fork()
        name = self.name(rel)
        path = self.path(rel)
        fetched = False
        since = time.monotonic()
        if not os.path.exists(path):
            self._raise_store_failure(since)  # the store failed this node just now: no new wait on it
        for _ in range(8):  # a file evicted between our download and our shared lock: fetch again
            lock = self._lock(name)
            lock.acquire(True, self.lock_timeout, f"the download of {self._named(rel)}",
                         check=lambda: self._raise_store_failure(since))
            try:
                found = self._touch(path, size)
                if found is True:
                    if not fetched:
                        with self._mutex:
                            self.hits += 1
                    yield path
                    return
            finally:
                lock.release()
            if found is not False:  # an inode: damaged (wrong size), drop it, then download it again
                logger.warning("the cached copy of %s has the wrong size: downloading it again", self._named(rel))
                self.invalidate(rel, found)
            fetched = self._fetch(rel, size, crc32, since) or fetched
        raise CacheTimeoutError(f"{self._named(rel)} was evicted from {self.dir} 8 times while being opened; "
                                f"cache_bytes={self.budget} is too small for the shards in use")

    def _touch(self, path: str, size: int | None = None) -> bool | int:
        """Mark ``path`` used now (its mtime is the LRU clock): True; False if it is not cached; its
        inode if its size is not ``size`` (a damaged copy)."""
        try:
            os.utime(path)
            st = os.stat(path)
        except FileNotFoundError:
            return False
        return True if size is None or st.st_size == size else int(st.st_ino)

    def invalidate(self, rel: str, inode: int | None = None) -> bool:
        """Remove the cached copy of ``rel`` because it failed a check (the next open downloads it
        again); with ``inode``, only if the copy is still that file (not a fresh download by another
        process). Returns whether a file was removed."""
        self._after_fork()
        path = self.path(rel)
        lock = self._lock(self.name(rel))
        lock.acquire(False, self.lock_timeout, f"the cache entry of {self._named(rel)}")
        try:
            return self._remove_copy(path, inode)
        finally:
            lock.release()

    def _remove_copy(self, path: str, inode: int | None) -> bool:
        try:
            if inode is not None and os.stat(path).st_ino != inode:
                return False
            os.remove(path)
        except FileNotFoundError:
            return False
        with self._mutex:
            self.invalidations += 1
        return True

    def _fetch(self, rel: str, size: int | None, crc32: int | None, since: float, prefetch: bool = False) -> bool:
        """Download ``rel`` unless it is cached or another process just did; True if this call did.

        A prefetch of ``rel`` by this process that failed after ``since`` (while we waited for it) is
        re-raised instead of trying again: it already ran the lake's bounded retries. So is a
        prefetch of any file that ended in `ObjectStoreError` after ``since``: the store failed this
        process just now, and a read waiting behind it (for a lock, or for room) gives up with it
        rather than start its own bounded retries after it. A ``prefetch`` waiting so gives up too.

        A failed download is noted (`_failed` for a prefetch, the node's failure note for the store's
        own failures) before its part file goes: removing the part frees the room other downloads
        wait for, and they must see the failure when they get it (observed: a worker waiting for room
        started a new 10 s download 10 ms after another's failed, before the note was written)."""
        name = self.name(rel)
        path = self.path(rel)
        lock = self._lock(name)
        borrowed: list[BaseException] = []  # failures of other downloads that `check` raised

        def check() -> None:
            try:
                self._raise_store_failure(since)
            except BaseException as exc:
                borrowed.append(exc)
                raise

        lock.acquire(False, self.lock_timeout, f"the download of {self._named(rel)}", check=check)
        part: str | None = None
        try:
            if os.path.exists(path):
                return False
            with self._mutex:
                failure = self._failed.get(rel)
            if failure is not None and failure[0] >= since:
                borrowed.append(failure[1])
                raise failure[1]
            check()
            if size is None:
                size = int(self._size(rel)) if self._size is not None else int(self.fs.size(self._remote(rel)))
            part = self._reserve(name, size, check)
            check()  # the room came free because downloads failed: they are noted by now
            try:
                self._download(rel, part, size, crc32)
            except OSError as exc:
                if exc.errno not in LOCAL_DISK_ERRNOS or exc.errno == errno.EROFS:
                    raise
                # the disk is fuller than the budget assumed (other files grew): make room from this
                # cache's least recently used files and try once more, else say whose disk is full
                with open(part, "wb"):
                    pass   # (the partial download's bytes go: free space is measured without them)
                self._free_disk(size)
                try:
                    self._download(rel, part, size, crc32)
                except OSError as again:
                    if again.errno not in LOCAL_DISK_ERRNOS:
                        raise
                    with open(part, "wb"):
                        pass
                    raise WriteFailedError(again.errno, f"{again.strerror} on the disk of the shard cache {self.dir} "
                                           f"while downloading {self._named(rel)} ({size:,} bytes; cache_bytes="
                                           f"{self.budget:,}, {_free(self.dir):,} bytes free): free space, or point "
                                           "cache_dir (M2M_CACHE_DIR) at a larger disk") from again
            os.rename(part, path)
        except BaseException as exc:
            if not any(exc is b for b in borrowed):
                if prefetch and isinstance(exc, Exception):
                    with self._mutex:
                        self._failed[rel] = (time.monotonic(), exc)
                self._note_store_failure(exc)
            if part is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(part)
            raise
        finally:
            lock.release()
        with self._mutex:
            self.fetches[rel] += 1
            self.fetch_bytes += size
            self._failed.clear()  # the store answers again
        with contextlib.suppress(OSError):
            os.remove(self._failure_note())
        return True

    def _download(self, rel: str, part: str, size: int, crc32: int | None) -> None:
        """Fetch the object into ``part`` (fsspec's streamed ``get_file``: one GET streamed to disk,
        not ``fs.open``'s buffered reads; docs/tuning.md), then check its size and CRC32 (read back
        from the page cache)."""
        from m2m.lake.checksum import file_crc32

        remote = self._remote(rel)
        logger.info("downloading %s (%d bytes) to the shard cache %s", remote, size, self.dir)
        if self._get is not None:
            self._get(rel, part)
        else:
            self.fs.get_file(remote, part)
        got = os.path.getsize(part)
        # no fsync: a cache file torn by a power loss is caught by the per-block checks of reads
        if got != size:
            raise CorruptShardError(f"shard object {self._named(rel)} has {got} bytes, the manifest says {size}")
        if crc32 is not None:
            crc = file_crc32(part)
            if crc != crc32:
                raise CorruptShardError(
                    f"shard object {self._named(rel)} is corrupt: CRC32 {crc:#010x} != manifest {crc32:#010x}")

    # ------------------------------------------------------------------ budget
    def _scan(self) -> tuple[list[tuple[float, int, str]], int]:
        """Finished files as (mtime, bytes, path), oldest first, and bytes reserved by live downloads
        (parts whose owner died are deleted here)."""
        done: list[tuple[float, int, str]] = []
        reserved = 0
        with os.scandir(self.dir) as it:
            for e in it:
                if _SHARD_NAME.fullmatch(e.name) and not e.is_symlink():
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    done.append((st.st_mtime, st.st_size, e.path))
                elif _STAGED_NAME.fullmatch(e.name) and not e.is_symlink():
                    # a writer's staged shard: uploaded and adopted, or removed on failure, within
                    # seconds; one this old belonged to a killed process
                    with contextlib.suppress(FileNotFoundError):
                        if time.time() - e.stat().st_mtime > STAGED_MAX_AGE_S:
                            os.remove(e.path)
                elif e.name.endswith(PART_SUFFIX):
                    fields = e.name.split(".")
                    if len(fields) != 4 or not fields[1].isdigit() or not _PART_OWNER.fullmatch(fields[0]):
                        continue
                    owner = self._lock(fields[0])
                    if owner.try_acquire():  # nobody downloads it: a leftover of a killed process
                        try:
                            os.remove(e.path)
                        except FileNotFoundError:
                            pass
                        owner.release()
                    else:
                        reserved += int(fields[1])
        done.sort()
        return done, reserved

    def _failure_note(self) -> str:
        return os.path.join(self._locks, f"{self._url_key[:40]}.store-failed")

    def _note_store_failure(self, exc: BaseException) -> None:
        """Tell the other processes of this node (DataLoader workers) that a download from this
        lake's store just ended in `ObjectStoreError` (a file whose mtime says when)."""
        if not getattr(exc, "store_down", False) or sys.is_finalizing():
            return  # only the store's own failures (after retries), never one of this process's client
        note = self._failure_note()
        tmp = f"{note}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(" ".join(str(exc).split()))
            os.replace(tmp, note)
        except OSError:  # a hint only
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def _raise_store_failure(self, since: float) -> None:
        """Raise if a download of this lake ended in `ObjectStoreError` after ``since`` (monotonic)
        or within the last `failure_hold` seconds (with no download done since): the latest of this
        process's prefetches, or another process's of this node."""
        since = min(since, time.monotonic() - self.failure_hold)
        with self._mutex:
            failures = [f for f in self._failed.values() if f[0] >= since and getattr(f[1], "store_down", False)]
        if failures:
            raise max(failures, key=lambda f: f[0])[1]
        try:
            st = os.stat(self._failure_note())
        except OSError:
            return
        if st.st_mtime >= time.time() - (time.monotonic() - since):
            try:
                with open(self._failure_note()) as f:
                    why = f.read(2000)
            except OSError:
                why = "(unknown)"
            raise ObjectStoreError(f"{self.url}: a download through this node cache (this or another process) just "
                                   f"failed, so this read gives up too (for io_timeout seconds): {why}")

    def _reserve(self, name: str, size: int, check: Callable[[], None] | None = None) -> str:
        """Make room for ``size`` bytes (evicting least recently used files) and create the part file
        that reserves them; waits (bounded) while other downloads hold the room (``check()`` runs
        while waiting, and may raise)."""
        deadline = time.monotonic() + self.lock_timeout
        while True:
            glock = _FileLock(os.path.join(self._locks, "cache.lock"))
            glock.acquire(False, self.lock_timeout, f"the cache lock of {self.dir}")
            try:
                done, reserved = self._scan()
                used = reserved + sum(s for _, s, _ in done)
                for _, s, p in done:
                    if used + size <= self.budget:
                        break
                    if self._evict(p):
                        used -= s
                if used + size <= self.budget or (reserved == 0 and used <= self.budget):
                    part = _inside(self.dir, os.path.join(self.dir, f"{name}.{size}.{uuid.uuid4().hex}{PART_SUFFIX}"))
                    open(part, "wb").close()
                    return part
            finally:
                glock.release()
            if time.monotonic() >= deadline:
                raise CacheTimeoutError(f"no room for {size} bytes in the shard cache {self.dir} "
                                        f"(cache_bytes={self.budget}) after {self.lock_timeout:.0f} s")
            if check is not None:
                check()
            time.sleep(0.05)

    def _free_disk(self, size: int) -> None:
        """Evict finished files, least recently used first, until the cache's disk has ``size`` bytes
        free. A file a reader still has open or mapped frees nothing when it goes, so evictions stop
        after two in a row that freed nothing (they emptied every worker's cache and freed nothing,
        when the other files were in use)."""
        glock = _FileLock(os.path.join(self._locks, "cache.lock"))
        glock.acquire(False, self.lock_timeout, f"the cache lock of {self.dir}")
        try:
            done, _ = self._scan()
            in_vain = 0
            for _, _, p in done:
                free = _free(self.dir)
                if free >= size or in_vain >= 2:
                    break
                if self._evict(p):
                    in_vain = in_vain + 1 if _free(self.dir) <= free else 0
        finally:
            glock.release()

    def _evict(self, path: str) -> bool:
        """Remove one finished file unless some process is opening it right now."""
        name = os.path.basename(path)[: -len(SHARD_SUFFIX)]
        lock = self._lock(name)
        if not lock.try_acquire():
            return False
        try:
            os.remove(path)
        except FileNotFoundError:
            return False
        finally:
            # the entry's lock file goes with it (one empty file per shard ever cached piled up in .locks)
            lock.remove()
        with self._mutex:
            self.evictions += 1
            listeners = list(self._listeners)
        for listener in listeners:
            listener.evicted(path)
        return True

    def cached_bytes(self) -> int:
        """Bytes of finished files plus reservations of downloads in flight (what the budget bounds)."""
        done, reserved = self._scan()
        return reserved + sum(s for _, s, _ in done)

    # ------------------------------------------------------------------ writing
    def insert(self, rel: str, local_src: str) -> None:
        """Adopt a local file just uploaded as ``rel`` (a writer's own shard), within the budget."""
        self._after_fork()
        size = os.path.getsize(local_src)
        name = self.name(rel)
        lock = self._lock(name)
        lock.acquire(False, self.lock_timeout, f"the cache entry of {self._named(rel)}")
        try:
            part = self._reserve(name, size)
            os.replace(local_src, part)
            os.rename(part, self.path(rel))
        finally:
            lock.release()

    def discard(self, rel: str) -> None:
        """Forget ``rel`` (its object was deleted)."""
        try:
            os.remove(self.path(rel))
        except FileNotFoundError:
            pass

    def new_local_file(self, suffix: str) -> str:
        """A staging path for a file a writer is about to upload (not counted until `insert`)."""
        return os.path.join(self.dir, f"{STAGED_PREFIX}{uuid.uuid4().hex}{suffix}")

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, files: Sequence[tuple[str, int | None, int | None]]) -> int:
        """Queue background downloads of ``(rel, bytes, crc32)`` not cached yet, in order, keeping at
        most ``prefetch_shards`` queued; returns how many were queued."""
        if self.prefetch_shards <= 0:
            return 0
        queued = 0
        self._after_fork()
        with self._mutex:
            self._queued = {r: f for r, f in self._queued.items() if not f.done()}
            for rel, size, crc in files:
                if len(self._queued) >= self.prefetch_shards:
                    break
                if rel in self._queued or os.path.exists(self.path(rel)):
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="m2m-cache-prefetch")
                self._queued[rel] = self._pool.submit(self._prefetch_one, rel, size, crc)
                queued += 1
        return queued

    def _prefetch_one(self, rel: str, size: int | None, crc: int | None) -> None:
        if sys.is_finalizing():  # the process is exiting (a worker done with its share): nothing to fetch for
            return
        try:
            self._fetch(rel, size, crc, time.monotonic(), prefetch=True)
        except Exception as exc:  # noqa: BLE001 -- its own failure is in _failed: an open() waiting for it raises it
            with self._mutex:
                own = self._failed.get(rel)
            # silent only when it gave up with another download's store failure (noted, and warned, there);
            # its own failure, or one before its download (a lock wait that timed out), is logged
            gave_up = isinstance(exc, ObjectStoreError) and not (own is not None and own[1] is exc)
            closed = isinstance(exc, LakeClosedError)   # said once, by the read that needs the file
            if not (gave_up or closed) and not sys.is_finalizing():  # (a process exiting mid-download is not worth a warning)
                logger.warning("prefetch of %s failed: %s", self._named(rel), exc)

    def wait_prefetch(self, timeout: float | None = None) -> None:
        """Wait for queued prefetches (tests and benchmarks)."""
        self._after_fork()
        with self._mutex:
            futures = list(self._queued.values())
        for f in futures:
            f.result(timeout=timeout)

    def stats(self) -> dict[str, Any]:
        """This process's downloads (count per file, bytes), cache hits, evictions and copies dropped
        because they failed a check."""
        self._after_fork()
        with self._mutex:
            return {"fetches": dict(self.fetches), "fetch_bytes": self.fetch_bytes, "hits": self.hits,
                    "evictions": self.evictions, "invalidations": self.invalidations}

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop prefetching; remove the cache directory if it is private (``cache_dir=None``)."""
        self._after_fork()
        with self._mutex:
            pool, self._pool = self._pool, None
            self._queued = {}
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=True, cancel_futures=True)
        if self.private and self._owner == os.getpid():
            remove = getattr(self, "_remove_dir", None)   # (a copy unpickled in a spawned worker has none)
            if remove is not None:
                remove()
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
