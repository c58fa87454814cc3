"""Where a lake's files live: a local directory (durable fsync/rename) or any fsspec URL."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)


class LakeFS(Protocol):
    """The few file operations a lake needs; paths are relative to the lake root, '/'-separated."""

    root: str
    is_local: bool

    def exists(self, rel: str) -> bool: ...
    def makedirs(self, rel: str) -> None: ...
    def listdir(self, rel: str) -> list[str]: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def write_atomic(self, rel: str, data: bytes) -> None: ...
    def write_file(self, rel: str, local_src: str) -> None: ...
    def remove(self, rel: str) -> None: ...
    def local_path(self, rel: str) -> str: ...
    def new_local_file(self, suffix: str) -> str: ...


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
        final = self._p(rel)
        directory = os.path.dirname(final)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        fsync_path(directory)

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


class FsspecFS:
    """A lake behind an fsspec URL (s3://, gs://, memory://, ...).

    Object stores have no rename or fsync: each file is written whole under its final, unique name
    (a PUT is atomic), the manifest last. Shards are downloaded once into a local cache directory to be
    memory-mapped, and verified there against their checksum.
    """

    is_local = False

    def __init__(self, url: str, cache_dir: str | None = None) -> None:
        import fsspec

        self.fs, path = fsspec.core.url_to_fs(url)
        self.root = path.rstrip("/")
        self.url = url
        key = hashlib.sha1(url.encode()).hexdigest()[:16]
        base = cache_dir or os.environ.get("M2M_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "m2m-cache")
        self.cache = os.path.join(base, key)
        os.makedirs(os.path.join(self.cache, "_data"), exist_ok=True)

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._p(rel)))

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self._p(rel), exist_ok=True)

    def listdir(self, rel: str) -> list[str]:
        try:
            entries = self.fs.ls(self._p(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def read_bytes(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self._p(rel)))

    def write_atomic(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(rel), data)

    def write_file(self, rel: str, local_src: str) -> None:
        self.fs.put_file(local_src, self._p(rel))
        cached = os.path.join(self.cache, rel)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        os.replace(local_src, cached)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._p(rel))
        except FileNotFoundError:
            pass
        try:
            os.remove(os.path.join(self.cache, rel))
        except FileNotFoundError:
            pass

    def local_path(self, rel: str) -> str:
        cached = os.path.join(self.cache, rel)
        if not os.path.exists(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = f"{cached}.part-{uuid.uuid4().hex}"
            logger.info("downloading %s to the local shard cache", rel)
            self.fs.get_file(self._p(rel), tmp)
            os.replace(tmp, cached)
        return cached

    def new_local_file(self, suffix: str) -> str:
        return os.path.join(self.cache, "_data", f".tmp-{uuid.uuid4().hex}{suffix}")


def open_fs(path: str | os.PathLike[str]) -> LakeFS:
    """The filesystem for a lake path: `LocalFS` for plain paths and file://, `FsspecFS` otherwise."""
    s = os.fspath(path)
    if "://" in s and not s.startswith("file://"):
        return FsspecFS(s)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return LocalFS(s)
