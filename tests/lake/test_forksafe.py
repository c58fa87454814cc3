"""A DataLoader worker forked while a thread of the parent holds a lake lock (a planning thread reading
shard scores, another loader's prefetch) gets that lock unlocked (`m2m._forksafe`): before, its first
read waited forever (found by tests/stream/test_sharded_export.py under load)."""

from __future__ import annotations

import multiprocessing
import pickle
import threading

import pytest
import torch

from m2m import M2MConfig, create_m2m
from m2m._forksafe import ForkSafeLock


def _child(snap, queue) -> None:
    got = snap._lock.acquire(timeout=5)
    rows = len(snap.column(0, "id")) if got else -1
    queue.put((got, rows))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
def test_a_forked_child_reads_while_a_parent_thread_holds_the_snapshot_lock(tmp_path):
    with create_m2m(M2MConfig(path=str(tmp_path / "l"), latent_dim=4)) as lake:
        lake.add_splats(torch.randn(50, 4))
        snap = lake.snapshot
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with snap._lock:
                held.set()
                release.wait(60)

        t = threading.Thread(target=hold)
        t.start()
        try:
            assert held.wait(10)
            ctx = multiprocessing.get_context("fork")
            queue = ctx.Queue()
            p = ctx.Process(target=_child, args=(snap, queue))
            p.start()
            got, rows = queue.get(timeout=60)
            p.join(30)
        finally:
            release.set()
            t.join()
        assert got and rows == 50


def test_the_lock_pickles_fresh_and_keeps_its_kind():
    lock = ForkSafeLock(reentrant=True)
    with lock:
        copy = pickle.loads(pickle.dumps(lock))
        assert copy.acquire(blocking=False)   # not the held one
        assert copy.acquire(blocking=False)   # reentrant
    plain = pickle.loads(pickle.dumps(ForkSafeLock()))
    assert plain.acquire(blocking=False) and not plain.acquire(blocking=False)
