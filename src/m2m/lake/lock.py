"""The lake's single-writer lock: an advisory `flock` on `<lake>/_lock`, released if the process dies."""

from __future__ import annotations

import fcntl
import os
import time
from types import TracebackType

from m2m.errors import LakeLockedError


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
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
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
