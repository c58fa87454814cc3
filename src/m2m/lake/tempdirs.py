"""Temporary lakes (``M2MConfig(path=None)``): folders that go away with the process that made them.

Each temporary lake is a ``m2m-lake-*`` folder in the system temp dir holding an `OWNER_FILE` that
records the creating process (pid and, where ``/proc`` exists, its start time, so a reused pid is not
taken for the owner). The folder is removed

- when the lake is closed, or when the last object using its files (the lake handle, its snapshots,
  a loader streaming them) is garbage-collected, or at interpreter exit if still alive (a
  `weakref.finalize` on the lake's filesystem object, run only in the creating process: a forked
  DataLoader worker never removes its parent's lake);
- otherwise (the process was killed, or exited through ``os._exit``, as a forked DataLoader worker
  does) by the next `create_temporary` in any process of the same user, which removes every such
  folder whose owner is gone.

A remote lake's private shard cache (``m2m-cache-*``) is kept the same way: an owner file, removed
with its handle or at exit, swept when its process is gone.

The sweep removes only real directories (never through a symlink) that carry a readable owner file
and belong to the current user; a folder without an owner file (another program's, or an older
m2m's) is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time
import weakref
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "m2m-lake-"
CACHE_PREFIX = "m2m-cache-"   # a remote lake's private shard cache (`m2m.lake.cache.ShardCache`)
OWNER_FILE = ".m2m-temporary"
_OWNER_MAX_BYTES = 4096


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: str | None) -> bool:
    """Whether the process that wrote an owner file (``pid``, ``start``) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return True  # unknown: keep the folder
    if start is None:
        return True
    now = _start_time(pid)
    return now is None or now == start  # another start time: the pid was reused


def create_temporary(prefix: str = PREFIX) -> str:
    """A new temporary lake folder owned by this process (stale ones of dead processes are removed first);
    ``prefix`` ``CACHE_PREFIX``: a remote lake's private shard cache, kept the same way."""
    sweep(prefix=prefix)
    path = tempfile.mkdtemp(prefix=prefix)
    doc = {"pid": os.getpid(), "start": _start_time(os.getpid()), "created": time.time()}
    with open(os.path.join(path, OWNER_FILE), "w", encoding="utf-8") as f:
        json.dump(doc, f)
    return path


def _owner(path: str) -> dict[str, Any] | None:
    """The owner record of a candidate folder, or None when it is not one of m2m's temporary lakes."""
    marker = os.path.join(path, OWNER_FILE)
    try:
        st = os.lstat(marker)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _OWNER_MAX_BYTES:
            return None
        fd = os.open(marker, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            doc = json.loads(f.read(_OWNER_MAX_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("pid"), int) or isinstance(doc.get("pid"), bool):
        return None
    if doc.get("start") is not None and not isinstance(doc["start"], str):
        return None
    return doc


def sweep(root: str | None = None, prefix: str = PREFIX) -> list[str]:
    """Remove the temporary lakes (or ``prefix`` folders) in ``root`` (default: the temp dir) whose owning
    process is gone; returns the removed paths. Never follows a symlink and never touches another
    user's folders."""
    root = tempfile.gettempdir() if root is None else root
    removed: list[str] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue  # a symlink, a file, or someone else's
        doc = _owner(entry.path)
        if doc is None or _alive(int(doc["pid"]), doc.get("start")):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)  # rmtree removes links inside, never their targets
        if not os.path.lexists(entry.path):
            removed.append(entry.path)
            logger.info("removed temporary lake %s of process %s, which is gone", entry.path, doc["pid"])
    return removed


def _remove(path: str, pid: int) -> None:
    if os.getpid() == pid:  # a forked child inherits the finalizer: only the creator removes the lake
        shutil.rmtree(path, ignore_errors=True)


def remove_with(owner: object, path: str) -> weakref.finalize[[str, int], object]:
    """Remove ``path`` when ``owner`` is garbage-collected or at interpreter exit, whichever is first;
    calling the returned finalizer removes it now (once)."""
    return weakref.finalize(owner, _remove, path, os.getpid())
