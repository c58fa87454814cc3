"""Locks that a forked child gets unlocked.

A DataLoader worker forked while a thread of the parent holds a lock (a loader's planning thread
reading shard scores, another loader's prefetch thread) inherits that lock held, by a thread the
child does not have: its first use waits forever. Objects the stream shares with its workers (a
snapshot, a manifest's segment memo, shard files and their block caches) guard their state with a
`ForkSafeLock`, which is replaced by a fresh lock in the child right after the fork
(``os.register_at_fork``, as the standard library's logging and concurrent.futures do for their own
locks). A lock held at the fork protected a half-done update of state the child would then see: the
state these locks guard is caches (entries are added whole under the lock), so the child keeps a
consistent copy. A thread that forks while holding one of these locks itself would, in the child,
release the fresh lock and get a RuntimeError; m2m never forks under a lake lock (DataLoader workers
start from the loader's iterator).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["ForkSafeLock"]

_LIVE: "weakref.WeakSet[ForkSafeLock]" = weakref.WeakSet()


class ForkSafeLock:
    """A ``threading.Lock`` (``reentrant``: an ``RLock``) that is new and unlocked in a forked child.
    Pickles as a fresh lock (a spawned worker's copy)."""

    __slots__ = ("__weakref__", "_lock", "_reentrant")

    def __init__(self, reentrant: bool = False) -> None:
        self._reentrant = reentrant
        self._lock: Any = threading.RLock() if reentrant else threading.Lock()
        _LIVE.add(self)

    def _reset(self) -> None:
        self._lock = threading.RLock() if self._reentrant else threading.Lock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def __reduce__(self) -> tuple[Any, tuple[bool]]:
        return (ForkSafeLock, (self._reentrant,))


def _after_fork_in_child() -> None:
    for lock in list(_LIVE):
        lock._reset()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
