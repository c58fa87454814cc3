"""The lake's single-writer lock: an advisory `flock` on `<lake>/_lock`, released if the process dies."""

from __future__ import annotations

import errno
import fcntl
import math
import os
import stat
import time
from types import TracebackType

from m2m.errors import ConfigError, CorruptShardError, LakeLockedError
from m2m.lake.fs import write_error


def lock_timeout() -> float:
    """Seconds a writer waits for another one's lock: ``$M2M_LOCK_TIMEOUT`` (default 0), a finite
    number >= 0 (`ConfigError` naming the variable and its value otherwise: NaN waited forever)."""
    raw = os.environ.get("M2M_LOCK_TIMEOUT", "0")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"M2M_LOCK_TIMEOUT must be a finite number of seconds >= 0, got {raw!r}")
    return value


class WriteLock:
    """Exclusive write lock of one lake, held for the duration of one commit.

    A second writer (another process or handle) gets `LakeLockedError` after ``timeout`` seconds.
    Remote (fsspec) lakes have no shared lock: they assume one writer process.
    """

    def __init__(self, path: str | None, timeout: float = 0.0) -> None:
        self._path = path
        self._timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> "WriteLock":
        if self._path is None:
            return self
        try:  # never through a link: the lock file is created in the lake, nowhere else
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise write_error(exc, "opening the lake lock", self._path) from exc
            raise CorruptShardError(f"the lake lock {self._path} is a symbolic link (to {os.path.realpath(self._path)}); "
                                    "m2m does not follow it: remove the link") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptShardError(f"the lake lock {self._path} is not a regular file: remove it")
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LakeLockedError(
                        f"another writer holds the lake lock {self._path}; wait for its commit to finish"
                    ) from None
                time.sleep(0.05)
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
