"""Where a lake's files live: a local directory (durable fsync/rename) or any fsspec URL."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from m2m._forksafe import ForkSafeLock
from m2m.errors import (
    LOCAL_DISK_ERRNOS,
    AlreadyExistsError,
    ConfigError,
    M2MError,
    MissingDependencyError,
    ObjectStoreError,
    PathNotFoundError,
    ReadOnlyLakeError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class LakeFS(Protocol):
    """The few file operations a lake needs; paths are relative to the lake root, '/'-separated."""

    url: str  # the lake's location as messages name it (``root`` with the store's scheme)

    root: str
    is_local: bool

    def exists(self, rel: str) -> bool: ...
    def makedirs(self, rel: str) -> None: ...
    def listdir(self, rel: str) -> list[str]: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def write_atomic(self, rel: str, data: bytes) -> None: ...
    def create_exclusive(self, rel: str, data: bytes) -> bool: ...
    def write_file(self, rel: str, local_src: str) -> None: ...
    def remove(self, rel: str) -> None: ...
    def local_path(self, rel: str) -> str: ...
    def new_local_file(self, suffix: str) -> str: ...
    def mark(self) -> int: ...
    def written_since(self, mark: int) -> list[str]: ...
    def note_written(self, rels: Iterable[str]) -> None: ...


def write_error(exc: OSError, what: str, path: str) -> OSError:
    """``exc`` (a failed write) naming ``path``: `ReadOnlyLakeError` when the file system refused it
    (permissions, a read-only mount), else the same type (e.g. ENOSPC) with ``while <what>``."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ReadOnlyLakeError(exc.errno, f"{exc.strerror or exc} while {what} (the lake cannot be written here; "
                                            "nothing was committed)", path)
    return type(exc)(exc.errno, f"{exc.strerror or exc} while {what}", path)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or directory by path (makes its data, or its entries, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalFS:
    """A lake in a local directory. Writes are temp file + fsync + rename + directory fsync."""

    is_local = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = str(Path(root).expanduser().resolve())
        self.url = self.root  # what messages name (a remote lake's has its scheme)
        self._written: list[str] = []  # files this handle wrote (list.append is atomic: no lock to pickle)

    def _record(self, rel: str) -> None:
        self._written.append(rel)

    def mark(self) -> int:
        """A position in the log of files this handle wrote (for `written_since`)."""
        return len(self._written)

    def written_since(self, mark: int) -> list[str]:
        """Files this handle wrote after ``mark`` (what a failed commit removes; no directory listing,
        whose cost grows with the lake)."""
        return list(self._written[mark:])

    def note_written(self, rels: Iterable[str]) -> None:
        """Log files another process wrote for this handle's commit as this handle's own (`RemoteFS`)."""
        self._written.extend(rels)

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._p(rel))

    def makedirs(self, rel: str) -> None:
        os.makedirs(self._p(rel), exist_ok=True)

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(rel)))
        except FileNotFoundError:
            return []

    def read_bytes(self, rel: str) -> bytes:
        with open(self._p(rel), "rb") as f:
            return f.read()

    def write_atomic(self, rel: str, data: bytes) -> None:
        self._record(rel)
        final = self._p(rel)
        directory = os.path.dirname(final)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # e.g. ENOSPC: name the file, leave nothing behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise write_error(exc, "writing", final) from exc
        os.rename(tmp, final)
        fsync_path(directory)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` durably unless it exists (False then): a hard link never replaces a file."""
        final = self._p(rel)
        directory = os.path.dirname(final)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # e.g. ENOSPC: name the file, leave nothing behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise write_error(exc, "writing", final) from exc
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: callers hold the lake's flock here
            if os.path.exists(final):
                return False
            os.rename(tmp, final)
            fsync_path(directory)
            return True
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        fsync_path(directory)
        return True

    def write_file(self, rel: str, local_src: str) -> None:
        """Move a finished, fsynced local file (made by `new_local_file`) to ``rel``."""
        final = self._p(rel)
        os.rename(local_src, final)
        fsync_path(os.path.dirname(final))

    def remove(self, rel: str) -> None:
        try:
            os.remove(self._p(rel))
        except FileNotFoundError:
            pass

    def local_path(self, rel: str) -> str:
        return self._p(rel)

    def new_local_file(self, suffix: str) -> str:
        """A temp path inside the lake's data directory (same filesystem, so the final rename is atomic)."""
        return self._p(f"_data/.tmp-{uuid.uuid4().hex}{suffix}")


# Errors a retry cannot fix: raised at once, as they are. Only errors known to be transient are
# retried (`_transient`); any other error (a client that is not fork-safe, a bug, a bad argument) is
# raised at once as an `ObjectStoreError` naming the object, never retried as if the store were down.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
              ValueError, TypeError, KeyError, NotImplementedError)
_PERMANENT_NAMES = {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "NoRegionError",
                    "InvalidBucketName", "NoSuchBucket", "NoSuchKey", "AccessDenied", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch"}
# Transport errors of botocore/aiobotocore, aiohttp, urllib3 and requests, matched by class name (anywhere
# in the class's MRO) so that no client library is imported here.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "HTTPClientError", "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError",
                    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError",
                    "ClientOSError", "IncompleteRead", "ProtocolError", "FSTimeoutError", "TransportError"}
# Error codes of a store's reply that say "try again later" (5xx, throttling).
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                    "ThrottlingException", "RequestTimeout", "RequestLimitExceeded", "TooManyRequests", "429"}
#: a retry is started only if it would end (taking as long as the attempt that just failed) within this
#: many ``io_timeout``s of the first attempt: quick failures (refused, reset) get every one of
#: ``io_retries``, while an attempt that ended in a timeout (a store that stopped answering) is not
#: repeated, so a stalled store gives an error about one ``io_timeout`` after the request began, and a
#: read queued behind it (`m2m.lake.cache`) within about two
RETRY_WINDOW = 2.0
#: an upload or delete of an async store (s3fs) is given ``io_timeout`` plus its bytes at this rate: its
#: client bounds reads by ``read_timeout`` but not a PUT to a store that stopped answering (measured
#: with s3fs 2026.9 on a SIGSTOPped moto server: a GET ends after read_timeout, a PUT waited 60 s, until
#: the server resumed); a store slower than this is treated as stalled
WRITE_FLOOR_BYTES_PER_S = 1 << 20

# Stores whose ``pipe_file(..., mode="create")`` is a real conditional put (one atomic request):
# S3 (``If-None-Match: *``, AWS since 2024-08, MinIO, R2, moto >= 5) and fsspec's in-process memory store.
_CONDITIONAL_PUT = {"s3", "s3a", "memory"}
# Stores whose client turns ``mode="create"`` into a precondition in recent versions (gcsfs:
# ``ifGenerationMatch=0`` -> 412 -> FileExistsError; adlfs: ``overwrite=False``, i.e. ``If-None-Match: *``):
# used when the installed client's ``_pipe_file`` handles "create", else one writer only.
_CONDITIONAL_PUT_IF_CLIENT_HAS_IT = {"gs", "gcs", "az", "abfs", "abfss"}


def _client_has_create(fs: Any) -> bool:
    import inspect

    try:
        return '"create"' in inspect.getsource(type(fs)._pipe_file)
    except (AttributeError, OSError, TypeError):
        return False


def _permanent(exc: BaseException) -> bool:
    """Errors raised as they are (callers handle a missing or existing file, our own errors, a full or
    read-only local disk under a download: retried as the store's and reported "store down" before)."""
    return (isinstance(exc, (_PERMANENT, M2MError)) or type(exc).__name__ in _PERMANENT_NAMES
            or (isinstance(exc, OSError) and exc.errno in LOCAL_DISK_ERRNOS))


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = error.get("Code") if isinstance(error, dict) else None
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return str(code or status) if (code or status) else None
    return None


def _transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: timeouts, refused or reset connections, 5xx and throttling replies.

    s3fs turns a store's error replies it does not know into ``OSError(EIO)`` (permanent ones become
    FileNotFoundError/PermissionError, caught by `_permanent` first), so plain OSErrors are retried."""
    import asyncio

    if _permanent(exc):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, asyncio.TimeoutError)):
        return True
    wrapped = (getattr(exc, "kwargs", None) or {}).get("error")  # botocore's HTTPClientError(error=...)
    if isinstance(wrapped, BaseException) and wrapped is not exc and not isinstance(wrapped, OSError):
        return _transient(wrapped)  # e.g. "cannot schedule new futures after interpreter shutdown"
    if any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__):
        return True
    code = _error_code(exc)
    if code is not None:
        return code in _TRANSIENT_CODES
    if isinstance(exc, OSError):
        return True
    cause = exc.__cause__
    return cause is not None and cause is not exc and _transient(cause)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    half = len(text) // 2
    if len(text) % 2 and text[:half] == text[half + 1:]:  # some clients repeat their message in args
        text = text[:half]
    if len(text) > 400:  # (pyarrow's hdfs lists every libjvm path it tried: 10 kB)
        text = text[:400] + " [...]"
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


class FsspecFS:
    """A lake behind an fsspec URL (s3://, gs://, memory://, ...).

    Object stores have no rename or fsync: each file is written whole under its final, unique name
    (a PUT is atomic), the manifest last, with a conditional put where the store has one (see
    `atomic_create`). Shards are read through a node-local disk cache (`m2m.lake.cache.ShardCache`:
    byte budget, LRU, shared by the processes of a node, verified against the manifest's checksum
    on download) and memory-mapped from there.

    Every request runs under a bounded retry loop: transient errors (timeouts, refused or reset
    connections, 5xx) are retried ``io_retries`` times with exponential backoff and jitter, then an
    `ObjectStoreError` naming the object is raised. For S3 the per-request connect/read timeouts are
    ``io_timeout`` seconds and botocore/s3fs do not retry on their own (so the bound is ours).
    """

    is_local = False

    def __init__(self, url: str, cache_dir: str | os.PathLike[str] | None = None,
                 storage_options: dict[str, Any] | None = None, io_timeout: float = 10.0, io_retries: int = 3,
                 cache_bytes: int | None = None) -> None:

        from m2m.lake.cache import ShardCache

        self.url = url.rstrip("/")
        self.protocol = url.split("://", 1)[0].lower()
        self.io_timeout = float(io_timeout)
        self.io_retries = int(io_retries)
        options = dict(storage_options or {})
        if self.protocol in ("s3", "s3a"):
            config_kwargs = dict(options.get("config_kwargs") or {})
            config_kwargs.setdefault("connect_timeout", self.io_timeout)
            config_kwargs.setdefault("read_timeout", self.io_timeout)
            # one request per attempt: botocore's ``max_attempts`` counts retries (1 meant two requests
            # per attempt, each waiting io_timeout on a stalled store); ``total_max_attempts`` counts requests
            config_kwargs.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
            options["config_kwargs"] = config_kwargs
        if self.protocol != "memory":
            # other writers' commits must be seen at once: no cached listings, no shared instance
            options.setdefault("use_listings_cache", False)
            options.setdefault("skip_instance_cache", True)
        self._options = options
        self._client: Any = None
        self._client_pid = -1
        self.root = self._connect()
        #: True when `create_exclusive` is one conditional request, safe with any number of writers
        self.atomic_create = self.protocol in _CONDITIONAL_PUT or (
            self.protocol in _CONDITIONAL_PUT_IF_CLIENT_HAS_IT and _client_has_create(self.fs))
        if cache_dir is None:
            cache_dir = os.environ.get("M2M_CACHE_DIR") or None
        self.cache = ShardCache(None, self.root, self.url, cache_dir, cache_bytes, download=self._download,
                                size=self._size)
        self.cache.failure_hold = self.io_timeout
        self._written: list[str] = []
        self._written_lock = ForkSafeLock()

    def _connect(self) -> str:
        """Build this process's client (``self._client``); returns the lake's path in the store."""
        import fsspec

        try:
            client, path = fsspec.core.url_to_fs(self.url, **self._options)
        except ImportError as exc:
            # fsspec names the package ("Please install gcsfs ..."); s3 comes with m2m's own extra
            extra = " (pip install 'm2m[s3]')" if self.protocol in ("s3", "s3a") else ""
            raise MissingDependencyError(f"lake {self.url}: the {self.protocol!r} filesystem needs a package that "
                                         f"is not installed{extra}: {_one_line(exc)}") from exc
        except ValueError as exc:
            if "protocol" not in str(exc).lower():
                raise
            raise ConfigError(f"lake {self.url}: {self.protocol!r} is not a filesystem fsspec knows "
                              f"({_one_line(exc)})") from exc
        except M2MError:
            raise
        except Exception as exc:  # a filesystem that cannot start here (hdfs without a JVM, zip:// of no file)
            raise ObjectStoreError(f"lake {self.url}: the {self.protocol!r} filesystem could not be opened: "
                                   f"{_one_line(exc)}") from exc
        if self.protocol in ("s3", "s3a"):
            client.retries = 1  # s3fs's own retry loop (5 x read_timeout) would hide ours
        self._client, self._client_pid = client, os.getpid()
        self._checked_copies: set[tuple[str, int, int]] = set()  # cached copies this process checked
        return str(path).rstrip("/")

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of this process. A client holds an event loop, a thread and
        connections that belong to the process that built it: a forked child (a DataLoader worker)
        builds its own on first use, and the parent's stays as it was."""
        if self._client_pid != os.getpid():
            if self.protocol == "memory":  # in-process store: the instance is the data, keep it
                self._client_pid = os.getpid()
            else:
                self._connect()
        return self._client

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn) get a copy, without the client
        state = dict(self.__dict__)
        del state["_written_lock"]
        if self.protocol != "memory":
            state.update(_client=None, _client_pid=-1)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._written_lock = ForkSafeLock()

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _call(self, op: str, rel: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with bounded retries of transient errors; `ObjectStoreError` at the end.

        Quick transient failures (refused, reset) are retried up to ``io_retries`` times with
        exponential backoff and jitter; a retry only starts if it can end (taking as long as the
        last attempt) within `RETRY_WINDOW` ``io_timeout``s of the first attempt, so a store that
        stopped answering (each attempt ends in a timeout) gives up after one or two attempts. Errors not known to be transient are never
        retried: the builtin ones a caller handles (missing file, ...) are raised as they are, others
        as an `ObjectStoreError` naming the object."""
        t0 = time.monotonic()
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, FileNotFoundError) and not isinstance(exc, PathNotFoundError):
                    # the store's own error names no object (s3fs: "The specified key does not exist.")
                    hint = (" (a vacuum since this reader opened its version removes that version's files: "
                            "reopen the lake; else run `m2m verify`)") if rel.startswith("_data/") else ""
                    raise PathNotFoundError(f"{op} {self.url}/{rel}: no such object{hint}") from exc
                if _permanent(exc):
                    if type(exc).__name__ in _PERMANENT_NAMES and not isinstance(exc, (_PERMANENT, M2MError)):
                        # the client's own class (botocore's NoCredentialsError, AccessDenied, ...): one
                        # line naming the object, the cause chained
                        refused = ObjectStoreError(f"{op} {self.url}/{rel} refused by the store (not retried): "
                                                   f"{_one_line(exc)}")
                        # a definite answer, so a refused put did not land, only on the first try: after a
                        # try that failed in transport (and may have landed) the outcome stays unknown
                        setattr(refused, "refused", attempt == 0)
                        raise refused from exc
                    raise
                attempt += 1
                now = time.monotonic()
                elapsed, took = now - t0, now - started
                if not _transient(exc):
                    raise ObjectStoreError(f"{op} {self.url}/{rel} failed, not retried (not a transient error): "
                                           f"{_one_line(exc)}") from exc
                delay = min(0.2 * 2 ** (attempt - 1), 2.0) * (0.5 + random.random())
                # the next attempt is expected to take as long as this one (a stalled store: each ends
                # in a timeout); start it only if it would end within the window
                if attempt > self.io_retries or elapsed + delay + took > RETRY_WINDOW * self.io_timeout:
                    err = ObjectStoreError(
                        f"{op} {self.url}/{rel} failed after {attempt} attempt(s) in {elapsed:.1f} s "
                        f"(io_timeout={self.io_timeout:g} s, io_retries={self.io_retries}): {_one_line(exc)}")
                    setattr(err, "store_down", True)  # the store itself failed: the node cache tells its readers
                    raise err from exc
                logger.info("%s %s/%s: %s; retry %d of %d in %.2f s", op, self.url, rel, _one_line(exc),
                            attempt, self.io_retries, delay)
                time.sleep(delay)

    def _record(self, rel: str) -> None:
        with self._written_lock:
            self._written.append(rel)

    def mark(self) -> int:
        """A position in the log of objects this handle wrote (for `written_since`)."""
        with self._written_lock:
            return len(self._written)

    def written_since(self, mark: int) -> list[str]:
        """Objects this handle wrote after ``mark`` (what a failed commit must remove)."""
        with self._written_lock:
            return list(self._written[mark:])

    def note_written(self, rels: Iterable[str]) -> None:
        """Log objects another process wrote for this handle's commit (a Ray task's shards and sidecars)
        as this handle's own: the commit checks they still exist before its put and removes them when it
        does not publish them (until 2026-12-08 only the driver's own writes were, so a Ray commit published
        files a vacuum had removed, and a lost race left the tasks' files behind)."""
        with self._written_lock:
            self._written.extend(rels)

    def exists(self, rel: str) -> bool:
        return bool(self._call("exists", rel, self.fs.exists, self._p(rel)))

    def makedirs(self, rel: str) -> None:
        self._call("makedirs", rel, self.fs.makedirs, self._p(rel), exist_ok=True)

    def listdir(self, rel: str) -> list[str]:
        return sorted(name for name, _ in self.list_detail(rel))

    def list_detail(self, rel: str) -> list[tuple[str, float | None]]:
        """``(name, last-modified epoch seconds or None)`` of the objects under ``rel``."""
        try:
            entries = self._call("list", rel, self.fs.ls, self._p(rel), detail=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            mtime = e.get("LastModified") or e.get("mtime") or e.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            out.append((name, float(mtime) if isinstance(mtime, (int, float)) else None))
        return out

    def read_bytes(self, rel: str) -> bytes:
        return bytes(self._call("read", rel, self.fs.cat_file, self._p(rel)))

    def _write_bound(self, nbytes: int) -> dict[str, float]:
        """The keyword that bounds one write request of an async client (fsspec's ``sync(timeout=)``:
        the request is cancelled and `FSTimeoutError` raised); nothing for other clients."""
        import fsspec.asyn

        if not isinstance(self.fs, fsspec.asyn.AsyncFileSystem):
            return {}
        return {"timeout": self.io_timeout + nbytes / WRITE_FLOOR_BYTES_PER_S}

    def write_atomic(self, rel: str, data: bytes) -> None:
        self._record(rel)
        self._call("write", rel, self.fs.pipe_file, self._p(rel), data, **self._write_bound(len(data)))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` unless it exists; False when another writer created it first.

        With `atomic_create` this is one conditional request. A retried request whose first try did
        land reads back as ours (same bytes), so a lost reply is never mistaken for a conflict.
        Elsewhere it is exists-then-put, safe for one writer only (`Lake.commit` says so loudly).
        """
        def put() -> bool:
            try:
                if self.atomic_create:
                    self.fs.pipe_file(self._p(rel), data, mode="create", **self._write_bound(len(data)))
                else:
                    if self.fs.exists(self._p(rel)):
                        raise AlreadyExistsError(rel)
                    self.fs.pipe_file(self._p(rel), data, **self._write_bound(len(data)))
                return True
            except FileExistsError:
                try:
                    return bytes(self.fs.cat_file(self._p(rel))) == data
                except FileNotFoundError:  # deleted in between (vacuum of an old version): a conflict
                    return False

        return self._call("create", rel, put)

    def _cached(self, rel: str) -> str:
        """``rel``'s path in the shard cache; never outside it (a defensive check: manifests are
        checked at parse, see `m2m.lake.manifest.check_file_path`)."""
        from m2m.errors import CorruptShardError

        if os.path.isabs(rel) or ".." in rel.split("/") or "\\" in rel:
            raise CorruptShardError(f"refusing path {rel!r}: it leaves the shard cache (and the lake)")
        return self.cache.path(rel)  # a hashed name inside the cache folder

    def write_file(self, rel: str, local_src: str) -> None:
        self._record(rel)
        self._call("upload", rel, self.fs.put_file, local_src, self._p(rel),
                   **self._write_bound(os.path.getsize(local_src)))
        self._cached(rel)  # refuses a path that leaves the cache
        self.cache.insert(rel, local_src)

    def remove(self, rel: str) -> None:
        self._cached(rel)  # refuses a path that leaves the lake before touching anything
        try:
            self._call("delete", rel, self.fs.rm_file, self._p(rel), **self._write_bound(0))
        except FileNotFoundError:
            pass
        self.cache.discard(rel)

    def _size(self, rel: str) -> int:
        """The byte size of object ``rel`` (retried like every request)."""
        return int(self._call("size", rel, lambda: self.fs.size(self._p(rel))))

    def _download(self, rel: str, local: str) -> None:
        """Fetch ``rel`` into the local file ``local`` (the shard cache's transfer, retried like every request)."""
        logger.info("downloading %s/%s to the shard cache", self.url, rel)
        self._call("download", rel, self.fs.get_file, self._p(rel), local)

    def local_path(self, rel: str) -> str:
        """The cached copy of ``rel`` (downloaded if needed; unverified: prefer `open_local`)."""
        self._cached(rel)
        with self.cache.open(rel) as path:
            return path

    def open_local(self, rel: str, size: int | None = None, crc32: int | None = None,
                   sha256: str | None = None) -> AbstractContextManager[str]:
        """``with fs.open_local(rel, bytes, crc32, sha256) as path``: the cached copy, verified on
        download and kept from eviction while the block runs (memory-map it there)."""
        self._cached(rel)
        if crc32 is None:
            return self.cache.open(rel, size, crc32)
        return self._open_checked(rel, size, crc32, sha256)

    @contextlib.contextmanager
    def _open_checked(self, rel: str, size: int | None, crc32: int, sha256: str | None) -> Iterator[str]:
        """`open_local` of a copy whose whole-file CRC32 (and SHA-256, for a signed lake's file) this
        process has checked: a copy this process did not download (another process's, an earlier run's)
        is checked once when first opened; a damaged or changed one is dropped and downloaded once more
        (the download's own check names the object)."""
        from m2m.lake.checksum import file_crc32

        for _ in range(2):
            before = self.cache.fetches.get(rel, 0)
            with self.cache.open(rel, size, crc32) as path:
                st = os.stat(path)
                key = (rel, st.st_ino, st.st_size)
                downloaded = self.cache.fetches.get(rel, 0) != before  # checked by the download itself
                if key in self._checked_copies or downloaded or (
                        file_crc32(path) == crc32 and (sha256 is None or _digest_matches(path, size, sha256))):
                    self._checked_copies.add(key)
                    yield path
                    return
            # (a signed lake's copy changed on the node's disk with its CRCs kept was kept, and failed
            # every later handle, while the object in the store was intact: observed)
            logger.warning("the cached copy of %s/%s failed its checksum: downloading it again", self.url, rel)
            self.cache.invalidate(rel, st.st_ino)
        from m2m.errors import CorruptShardError

        raise CorruptShardError(f"shard object {self.url}/{rel}: its cached copy failed its checksum twice")

    def new_local_file(self, suffix: str) -> str:
        return self.cache.new_local_file(suffix)

    def close(self) -> None:
        """Stop prefetching; delete the cache if it is this handle's private one (no ``cache_dir``)."""
        self.cache.close()


def _digest_matches(path: str, size: int | None, sha256: str) -> bool:
    """Whether the file at ``path`` has the size and SHA-256 its signed manifest names (a signed lake's
    file; `m2m.lake.shard` checks it again at a file's first open, as for any copy)."""
    from m2m.lake.checksum import fd_sha256

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        total, digest = fd_sha256(fd)
    finally:
        os.close(fd)
    return (size is None or total == size) and digest == sha256


def open_fs(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
            io_timeout: float = 10.0, io_retries: int = 3, cache_dir: str | os.PathLike[str] | None = None,
            cache_bytes: int | None = None) -> LakeFS:
    """The filesystem for a lake path: `LocalFS` for plain paths and file://, `FsspecFS` otherwise
    (``storage_options`` go to fsspec; ``cache_dir``/``cache_bytes`` are its node-local shard cache,
    see `m2m.lake.cache`; local paths ignore them)."""
    local = local_path(path)
    if local is None:
        return FsspecFS(os.fspath(path), cache_dir=cache_dir, storage_options=storage_options,
                        io_timeout=io_timeout, io_retries=io_retries, cache_bytes=cache_bytes)
    return LocalFS(local)


#: fsspec's names for its local filesystem: a lake named by them is a local lake (flock, fsync, the
#: symlink rules of vacuum), never one reached through fsspec's generic object-store path
LOCAL_PROTOCOLS = ("file", "local")


def local_path(path: str | os.PathLike[str]) -> str | None:
    """``path`` as a local path (a plain path, or a ``file://`` / ``local://`` URL) with ``~`` expanded
    as `LocalFS` does, or None for any other URL. An empty path is refused: it would name the current
    directory without saying so. (The CLI's checks compared ``~/lake`` unexpanded, as ``./~/lake``: an
    export into the lake's ``_data`` passed, a failed first ingest left its new lake behind.)"""
    s = os.fspath(path)
    protocol, sep, rest = s.partition("://")
    if sep:
        if protocol.lower() not in LOCAL_PROTOCOLS:
            return None
        # file://localhost/tmp/x is /tmp/x (RFC 8089; it was taken as the relative path localhost/tmp/x)
        s = rest[len("localhost"):] if rest.lower().startswith("localhost/") else rest
    if not s.strip():
        raise ConfigError(f"lake path {os.fspath(path)!r} names no folder (give a directory or a URL)")
    return os.path.expanduser(s)
