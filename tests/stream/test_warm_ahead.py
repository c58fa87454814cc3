"""The warm arena's load-ahead thread (partial arenas, block-shuffled epochs): what it loads, that a
gather never reads a slot a load is filling or evicting, and that a failed load-ahead surfaces in the
gather that needs the block, with its type."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from stream_helpers import make_source

from m2m.errors import CorruptShardError
from m2m.stream import columns as cols
from m2m.stream.order import Layout, rank_epoch
from m2m.stream.stages import warm
from m2m.stream.stages.batches import BatchStage
from m2m.stream.stages.cold import ColdReader
from m2m.stream.stages.hot import HostBuffers
from m2m.stream.stages.warm import WarmArena, WarmStage
from m2m.stream.topology import World

N, D, BR = 2000, 8, 50


class SlowReader(ColdReader):
    """A reader whose block reads take ``delay`` seconds (so loads and gathers interleave) and that
    fails on the blocks in ``bad``."""

    def __init__(self, *args, delay: float = 0.0, bad: frozenset[int] = frozenset(), **kw) -> None:
        super().__init__(*args, **kw)
        self.delay, self.bad = delay, bad
        self.threads: set[str] = set()

    def read_rows(self, name, lo, hi, dst, fresh=True):
        self.threads.add(threading.current_thread().name)
        if lo // BR in self.bad:
            raise CorruptShardError(f"block {lo // BR} is damaged (test)")
        time.sleep(self.delay)
        return super().read_rows(name, lo, hi, dst, fresh)


def arena_of(source, reader, slots: int, ahead: bool = True) -> WarmArena:
    columns = cols.resolve(source, None)
    return WarmArena(reader, columns, BR, budget_bytes=slots * BR * D * 4, ahead=ahead)


def test_load_ahead_makes_blocks_resident_without_a_gather():
    source = make_source(N, D, extra=False)
    arena = arena_of(source, ColdReader(source, ["mu"]), slots=8)
    try:
        rows = np.arange(3 * BR, 6 * BR)
        arena.load_ahead(rows)
        deadline = time.monotonic() + 10
        while arena.ahead_loads < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert arena.ahead_loads == 3 and set(arena.resident_blocks.tolist()) == {3, 4, 5}
        before = arena.loads
        out = {"embedding": torch.empty((len(rows), D))}
        arena.gather(rows, out)
        assert arena.loads == before  # nothing left to load
        np.testing.assert_array_equal(out["embedding"].numpy(), source.column(0, "mu")[rows])
        arena.load_ahead(rows)  # resident blocks are not queued again
        assert arena.ahead_loads == 3
    finally:
        arena.close()
    assert arena._loaders and not any(t.is_alive() for t in arena._loaders)


def test_a_whole_lake_arena_or_a_disabled_one_starts_no_thread():
    source = make_source(N, D, extra=False)
    for arena in (arena_of(source, ColdReader(source, ["mu"]), slots=N // BR),
                  arena_of(source, ColdReader(source, ["mu"]), slots=8, ahead=False)):
        assert not arena.ahead
        arena.close()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("slots", [4, 6, 12])
def test_gathers_stay_exact_while_loads_evict_under_them(slots, threads, monkeypatch):
    monkeypatch.setattr(warm, "AHEAD_THREADS", threads)
    # slow loads and few slots: the load-ahead thread keeps evicting while gathers read; every value
    # must still be the row's (a gather pins its slots; a load never takes a pinned or busy slot)
    source = make_source(N, D, extra=False)
    mu = source.column(0, "mu")
    reader = SlowReader(source, ["mu"], delay=0.001)
    arena = arena_of(source, reader, slots=slots)
    rng = np.random.default_rng(slots)
    try:
        for _ in range(60):
            rows = rng.integers(0, N, 64)
            rows = rows[(rows // BR) % 7 < 2]  # a few blocks per request
            arena.load_ahead(rng.integers(0, N, 32))  # and ahead requests all over the lake
            out = {"embedding": torch.empty((len(rows), D))}
            arena.gather(rows, out)
            np.testing.assert_array_equal(out["embedding"].numpy(), mu[rows])
        assert arena.ahead_loads > 0 and arena.evictions > 0
        assert any(t.startswith("m2m-warm-ahead") for t in reader.threads)
        arena.cancel_ahead()
        deadline = time.monotonic() + 10
        while arena._loading and time.monotonic() < deadline:  # the load in flight, if any, ends
            time.sleep(0.01)
        assert (arena._pins == 0).all() and not arena._busy.any() and not arena._loading
    finally:
        arena.close()


def test_a_failed_load_ahead_is_raised_by_the_gather_that_needs_the_block():
    source = make_source(N, D, extra=False)
    reader = SlowReader(source, ["mu"], bad=frozenset({7}))
    arena = arena_of(source, reader, slots=8)
    try:
        arena.load_ahead(np.arange(6 * BR, 9 * BR))
        deadline = time.monotonic() + 10
        while arena.ahead_loads < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        out = {"embedding": torch.empty((BR, D))}
        arena.gather(np.arange(6 * BR, 7 * BR), out)  # loaded ahead: fine
        with pytest.raises(CorruptShardError, match="block 7 is damaged"):
            arena.gather(np.arange(7 * BR, 8 * BR), out)
        assert 7 not in arena.resident_blocks.tolist() and not arena._loading
    finally:
        arena.close()


def test_a_block_shuffled_pass_loads_most_blocks_ahead_and_delivers_every_row():
    source = make_source(N, D, extra=False, shard_rows=300)
    mu = np.concatenate([source.column(s, "mu") for s in range(len(source.shard_offsets) - 1)])
    layout = Layout("block", BR, 2)
    plan = rank_epoch(layout, N, 32, False, 7, 0, 0, 1)
    columns = cols.resolve(source, None)
    arena = WarmArena(ColdReader(source, ["mu"]), columns, BR, budget_bytes=8 * BR * D * 4, ahead=True)
    stage = WarmStage(BatchStage(plan, 0, 0, World(), 2, lookahead_rows=BR * 2), arena, columns, HostBuffers())
    seen = []
    try:
        for work in stage:
            np.testing.assert_array_equal(work.tensors["embedding"].numpy(), mu[work.rows])
            seen.append(work.rows.copy())
            time.sleep(0.005)  # a training step: the load-ahead thread has time to run
        stage.shutdown()
    finally:
        arena.close()
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(N))
    # each block read once in the epoch (none loaded ahead and evicted unused), most of them ahead
    assert arena.loads == arena.num_blocks and arena.ahead_loads >= arena.num_blocks // 2


class AdvisingReader(ColdReader):
    """A reader that records the read-ahead advice it gives (a local source: all of it)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.advised: list[tuple[int, int]] = []

    def willneed(self, lo, hi):
        self.advised.append((lo, hi))
        super().willneed(lo, hi)


def test_a_whole_lake_fill_advises_the_whole_lake_once_and_fills_exactly():
    # the background fill reads every block once: it asks the kernel to read the files ahead first
    source = make_source(N, D, extra=False)
    reader = AdvisingReader(source, ["mu"])
    arena = arena_of(source, reader, slots=N // BR)
    try:
        assert arena.whole
        arena.start_fill()
        arena.start_fill()  # a second call starts nothing and advises nothing
        assert arena.wait_filled(timeout=30)
        assert reader.advised == [(0, N)]
        out = {"embedding": torch.empty((N, D))}
        rows = np.random.default_rng(0).permutation(N)
        arena.gather(rows, out)
        np.testing.assert_array_equal(out["embedding"].numpy(), source.column(0, "mu")[rows])
    finally:
        arena.close()
