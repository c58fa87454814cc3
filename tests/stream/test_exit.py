"""What runs when the interpreter exits: a warm arena with a running thread is closed first.

Before: only loaders and passes were registered (`m2m.stream.at_exit.close_at_exit`); a loader that
was a local variable of a function that returned was gone by exit while its arena's huge-page collapse
thread still ran, and 1 process exit in 6 aborted ("terminate called without an active exception",
measured with the stream benchmark's out-of-core child; docs/stream.md, "Lifecycle")."""

from __future__ import annotations

import gc
import weakref

import numpy as np
from stream_helpers import make_source

from m2m.stream import at_exit
from m2m.stream.loader import make_loader


def _one_pass_then_drop() -> weakref.ref:
    dl = make_loader(make_source(4000, 16, dtype=np.float32, shard_rows=1000), batch_size=100,
                     columns=("embedding", "id"), warm_bytes=1 << 22, shuffle_mode="full")
    assert sum(len(b["id"]) for b in dl) == 4000
    arena = dl._res.arena
    assert arena is not None and arena.whole
    threads = [t for t in (arena._filler, arena._collapser) if t is not None]
    assert threads, "the whole-lake arena started no thread"
    assert arena in at_exit._LIVE          # registered when it started them
    return weakref.ref(arena)


def test_an_arena_that_started_threads_is_closed_at_exit_even_when_its_loader_is_gone():
    ref = _one_pass_then_drop()
    gc.collect()
    arena = ref()
    if arena is None:   # its threads had ended: nothing left to close
        return
    assert arena in at_exit._LIVE
    arena.close()                         # what the exit hook does: stop and join its threads
    assert all(t is None or not t.is_alive() for t in (arena._filler, arena._collapser))


def test_no_arena_thread_starts_once_the_interpreter_is_exiting(monkeypatch):
    # an arena finalised during teardown (after the exit hook ran) must not start its collapse or fill
    monkeypatch.setattr(at_exit, "_EXITING", [True])
    dl = make_loader(make_source(2000, 16, dtype=np.float32, shard_rows=1000), batch_size=100,
                     columns=("embedding", "id"), warm_bytes=1 << 22, shuffle_mode="full")
    assert sum(len(b["id"]) for b in dl) == 2000     # the gathers load the blocks themselves
    arena = dl._res.arena
    assert arena is not None and arena._filler is None and arena._collapser is None
    dl.close()
