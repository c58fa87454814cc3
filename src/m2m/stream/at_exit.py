"""Closing what is still alive when the interpreter exits (loaders, passes, warm arenas with threads).

Background threads (daemon threads: a loader never keeps a process alive) that are still inside torch
or a C extension while the interpreter tears down abort the process ("terminate called without an
active exception"). `close_at_exit` registers an object whose ``close()`` stops and joins them; the
registry holds it weakly, so it costs nothing once the object is gone. A warm arena registers itself
when it starts a thread: its threads hold it, so a loader collected before exit (a local variable of a
function that returned) no longer leaves an arena filling or collapsing into the interpreter's
teardown (1 process exit in 6 aborted that way before, tests/stream/test_exit.py).
"""

from __future__ import annotations

import atexit
import sys
import threading
import weakref
from typing import Any

__all__ = ["close_at_exit", "exiting"]

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()  # what to close before the interpreter ends
_LIVE_LOCK = threading.Lock()
_AT_EXIT: list[bool] = []
_EXITING: list[bool] = []  # set when the exit hook starts


def close_at_exit(obj: Any) -> None:
    """Close ``obj`` (a loader, a pass, a warm arena: anything with ``close()``) when the interpreter
    exits, if it is still alive then (see the module docstring)."""
    with _LIVE_LOCK:
        _LIVE.add(obj)
        if not _AT_EXIT:
            atexit.register(_close_live)
            _AT_EXIT.append(True)


def exiting() -> bool:
    """Whether the interpreter is exiting (the hook below ran, or finalisation began): no new thread
    may start then; an object collected during teardown would otherwise start one the hook never sees."""
    return bool(_EXITING) or sys.is_finalizing()


def _close_live() -> None:
    _EXITING.append(True)
    with _LIVE_LOCK:
        live = list(_LIVE)
    for obj in live:
        try:
            obj.close()
        except Exception:  # noqa: BLE001, S110 - best effort at exit: the next one must still be closed
            pass
