"""Each stage alone on the CPU: batches, cold, warm, hot, prefetch (with the one resume harness)."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch
from stream_helpers import check_stage_start, make_source, run_stage

from m2m.errors import StreamError
from m2m.stream import columns as cols
from m2m.stream.order import Layout, rank_epoch
from m2m.stream.stages.base import Stage, Work
from m2m.stream.stages.batches import BatchStage
from m2m.stream.stages.cold import ColdReader, ColdStage
from m2m.stream.stages.hot import (
    HostBuffers,
    HotStage,
    OutputPool,
    ResidentStage,
    ResidentTier,
)
from m2m.stream.stages.prefetch import Prefetcher
from m2m.stream.stages.warm import WarmArena, WarmStage
from m2m.stream.topology import World

N, D, BS = 1000, 8, 32
LAYOUT = Layout("block", 50, 2)


def batch_stage(world=World(), chunk=3, lookahead=0, start=0, epoch=0):
    plan = rank_epoch(LAYOUT, N, BS, False, 7, epoch, world.rank, world.world_size)
    return BatchStage(plan, epoch, start, world, chunk, lookahead)


def chain(kind: str, source, names=("embedding", "id", "label", "weight"), budget=1 << 20, prefetch=False,
          start=0):
    columns = cols.resolve(source, names)
    reader = ColdReader(source, [c.source for c in columns if c.source is not None])
    stage: Stage = batch_stage(lookahead=100, start=start)
    buffers = HostBuffers()
    if kind == "cold":
        stage = ColdStage(stage, reader, columns, buffers, LAYOUT.block_rows)
    elif kind == "warm":
        stage = WarmStage(stage, WarmArena(reader, columns, LAYOUT.block_rows, budget), columns, buffers)
    elif kind == "resident":
        stage = ResidentStage(stage, ResidentTier(reader, columns, torch.device("cpu")), columns)
    if kind in ("cold", "warm"):
        stage = HotStage(stage, columns, torch.device("cpu"), buffers)
    if prefetch:
        stage = Prefetcher(stage, capacity=2)
    return stage


def test_batch_stage_starts_anywhere_and_splits_over_workers():
    n_items = check_stage_start(lambda start: batch_stage(start=start))
    assert n_items == -(-(-(-N // BS)) // 3)
    check_stage_start(lambda start: batch_stage(start=max(start, 5), epoch=2))
    # two workers' items together are the single reader's items
    one = [(w.first, w.end) for w in iter_stage(batch_stage())]
    two = [(w.first, w.end) for k in range(2) for w in iter_stage(batch_stage(World(0, 1, k, 2)))]
    assert sorted(two) == one


def iter_stage(stage):
    return run_stage(stage)


@pytest.mark.parametrize("kind", ["cold", "warm", "resident"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_gather_stages_deliver_the_right_rows_and_resume(kind, prefetch):
    source = make_source(N, D, shard_rows=300)
    mu = np.concatenate([source.column(s, "mu") for s in range(4)])
    items = iter_stage(chain(kind, source, prefetch=prefetch))
    for w in items:
        np.testing.assert_array_equal(w.tensors["embedding"].numpy(), mu[w.rows])
        np.testing.assert_array_equal(w.tensors["id"].numpy(), w.rows + 10_000)
        assert w.tensors["embedding"].dtype == torch.float32 and w.tensors["label"].dtype == torch.int64
        assert torch.equal(w.tensors["weight"], torch.ones(len(w.rows)))
    check_stage_start(lambda start: chain(kind, source, prefetch=prefetch, start=start))


def test_cold_reader_reads_ranges_across_shards():
    source = make_source(N, D, shard_rows=128)
    reader = ColdReader(source, ["mu", "neighbors"])
    mu = np.concatenate([source.column(s, "mu") for s in range(len(source.shard_offsets) - 1)])
    dst = np.empty((400, D), np.float32)
    assert reader.read_rows("mu", 100, 500, dst) == dst.nbytes
    np.testing.assert_array_equal(dst, mu[100:500])
    rows = np.random.default_rng(0).integers(0, N, 777)
    out = torch.empty((777, 3), dtype=torch.int64)
    reader.gather("neighbors", rows, out)
    nb = np.concatenate([source.column(s, "neighbors") for s in range(len(source.shard_offsets) - 1)])
    np.testing.assert_array_equal(out.numpy(), nb[rows])
    reader.willneed(0, N)  # advisory on anonymous memory: must not fail


def test_warm_arena_accounts_bytes_and_evicts_lru():
    source = make_source(N, D, extra=False)
    columns = cols.resolve(source, None)
    reader = ColdReader(source, ["mu"])
    block_bytes = 50 * D * 4
    arena = WarmArena(reader, columns, 50, budget_bytes=3 * block_bytes + 7)
    assert arena.slots == 3 and arena.nbytes == 3 * block_bytes <= 3 * block_bytes + 7
    mu = source.column(0, "mu")
    out = {"embedding": torch.empty((10, D))}
    for block in (0, 1, 2):
        rows = np.arange(block * 50, block * 50 + 10)
        arena.gather(rows, out)
        np.testing.assert_array_equal(out["embedding"].numpy(), mu[rows])
    arena.gather(np.arange(0, 10), out)  # touch block 0: block 1 is now the least recently used
    arena.gather(np.arange(150, 160), out)  # block 3 evicts block 1
    assert set(arena.resident_blocks.tolist()) == {0, 2, 3} and arena.evictions == 1
    # a request wider than the arena is served in pieces, still exactly
    rows = np.random.default_rng(1).integers(0, N, 500)
    wide = {"embedding": torch.empty((500, D))}
    arena.gather(rows, wide)
    np.testing.assert_array_equal(wide["embedding"].numpy(), mu[rows])
    assert arena.nbytes == 3 * block_bytes


def test_whole_lake_arena_loads_exactly_the_blocks_each_request_misses():
    # an arena holding the whole lake loads a request's missing blocks (block b into slot b) and
    # nothing else; once complete, requests read only RAM (max_loads applies to partial arenas)
    source = make_source(N, D, extra=False, shard_rows=300)
    mu = np.concatenate([source.column(s, "mu") for s in range(4)])
    arena = WarmArena(ColdReader(source, ["mu"]), cols.resolve(source, None), 50, budget_bytes=1 << 20,
                      max_loads=3)
    rng = np.random.default_rng(0)
    seen: set[int] = set()
    for _ in range(12):
        rows = rng.integers(0, N, 20)
        out = {"embedding": torch.empty((20, D))}
        before = arena.loads
        arena.gather(rows, out)
        new = set((rows // 50).tolist()) - seen
        seen |= new
        assert arena.loads - before == len(new)
        np.testing.assert_array_equal(out["embedding"].numpy(), mu[rows])
    arena.gather(np.arange(N), {"embedding": torch.empty((N, D))})
    assert arena.loads == arena.num_blocks == 20 and arena.complete


def test_warm_arena_rejects_a_budget_below_one_block():
    source = make_source(N, D, extra=False)
    with pytest.raises(StreamError, match="holds no block"):
        WarmArena(ColdReader(source, ["mu"]), cols.resolve(source, None), 50, budget_bytes=100)


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def test_warm_tier_memory_stays_within_budget(tmp_path):
    """A memory-mapped 205 MB lake streamed with a 4 MB warm budget: anonymous memory stays bounded."""
    n, d = 200_000, 256
    path = tmp_path / "mu.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, 20_000):
        mm[lo:lo + 20_000] = np.arange(lo, lo + 20_000, dtype=np.float32)[:, None]
    mm.flush()
    del mm
    from m2m.stream.loader import make_loader
    from m2m.stream.source import ArraySource

    source = ArraySource({"mu": np.load(path, mmap_mode="r")}, shard_rows=30_000)
    budget = 4 << 20
    dl = make_loader(source, batch_size=256, warm_bytes=budget, hot_bytes=0, block_rows=512)
    assert dl.spec.layout.mode == "block" and dl.stats()["warm_mode"] == "arena"
    before = rss_anon_bytes()
    peak = before
    seen = np.zeros(n, dtype=np.int64)
    for i, batch in enumerate(dl):
        rows = batch[:, 0].numpy().astype(np.int64)
        np.testing.assert_array_equal(batch[:, -1].numpy(), rows)
        seen[rows] += 1
        if i % 16 == 0:
            peak = max(peak, rss_anon_bytes())
    assert (seen == 1).all()
    assert dl._res.arena is not None and dl._res.arena.nbytes <= budget
    assert dl._res.arena.evictions > 0 and dl.stats()["bytes_cold"] >= n * d * 4
    grew = peak - before
    assert grew <= budget + (64 << 20), f"anonymous memory grew {grew >> 20} MB for a {n * d * 4 >> 20} MB lake"


def test_hot_cpu_converts_float16_to_fresh_float32():
    source = make_source(N, D, dtype=np.float16)
    columns = cols.resolve(source, ("embedding", "kappa"))
    buffers = HostBuffers()
    stage = HotStage(ColdStage(batch_stage(), ColdReader(source, ["mu", "kappa"]), columns, buffers), columns,
                     torch.device("cpu"), buffers)
    items = iter_stage(stage)
    mu = source.column(0, "mu")
    for w in items:
        assert w.tensors["embedding"].dtype == torch.float32
        np.testing.assert_array_equal(w.tensors["embedding"].numpy(), mu[w.rows].astype(np.float32))
    # converted outputs are fresh: later items did not overwrite earlier ones
    assert len({w.tensors["embedding"].data_ptr() for w in items}) == len(items)


def test_host_buffers_reuse_only_what_is_copied_later():
    source = make_source(10, 4, dtype=np.float16)
    c16, cid = cols.resolve(source, ("embedding", "id"))
    buffers = HostBuffers(slots=2)
    buffers.begin()
    a16, aid = buffers.get(c16, 5), buffers.get(cid, 5)
    buffers.begin()
    b16 = buffers.get(c16, 5)
    buffers.begin()
    c16b, cidb = buffers.get(c16, 4), buffers.get(cid, 5)
    assert a16.data_ptr() == c16b.data_ptr() and a16.data_ptr() != b16.data_ptr()
    assert aid.data_ptr() != cidb.data_ptr()


def test_output_pool_reuses_only_buffers_nobody_holds():
    pool = OutputPool(size=2)
    a = pool.get("x", 10, (4,), torch.float32)
    ptr = a.data_ptr()
    held = a[:3]  # the consumer keeps a view of the first buffer
    del a
    b = pool.get("x", 10, (4,), torch.float32)
    assert b.data_ptr() != ptr
    del b
    c = pool.get("x", 8, (4,), torch.float32)  # the second buffer is free again: reused
    assert c.data_ptr() != ptr
    d = pool.get("x", 10, (4,), torch.float32)  # both pooled buffers in use: a fresh one
    assert pool.fresh == 1 and d.data_ptr() not in (ptr, c.data_ptr())
    del held
    e = pool.get("x", 10, (4,), torch.float32)
    assert e.data_ptr() == ptr
    f = pool.get("x", 10, (4,), torch.float32)  # e itself (not a view of it) is held: not reused
    assert f.data_ptr() != e.data_ptr()


def test_loader_batches_kept_by_the_user_are_never_overwritten():
    from m2m.stream.loader import make_loader

    source = make_source(3000, D, dtype=np.float16)
    dl = make_loader(source, batch_size=16, columns=("embedding", "id"), warm_bytes=1 << 20, hot_bytes=0,
                     chunk_batches=2)
    kept = list(dl)  # the pool runs dry and falls back to fresh buffers
    mu = source.column(0, "mu").astype(np.float32)
    for b in kept:
        np.testing.assert_array_equal(b["embedding"].numpy(), mu[b["id"].numpy() - 10_000])


class Failing(Stage):
    def __init__(self, fail_at: int, exc: BaseException) -> None:
        self.fail_at, self.exc, self.i = fail_at, exc, 0

    def __next__(self):
        self.i += 1
        if self.i == self.fail_at:
            raise self.exc
        return Work(0, self.i, self.i + 1, np.arange(3), None)

    def shutdown(self):
        pass


def test_prefetch_errors_reach_the_consumer_within_a_second():
    pf = Prefetcher(Failing(3, ValueError("disk on fire")), capacity=1)
    pf.start()
    next(pf), next(pf)
    t0 = time.perf_counter()
    with pytest.raises(StreamError, match="disk on fire") as info:
        next(pf)
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(StopIteration):
        next(pf)
    pf.shutdown()


class Slow(Failing):
    def __next__(self):
        time.sleep(0.01)
        return super().__next__()


def live_prefetch_threads() -> int:
    return sum(t.name == "m2m-prefetch" and t.is_alive() for t in threading.enumerate())


def wait_threads_gone(timeout: float = 2.0) -> int:
    deadline = time.perf_counter() + timeout
    while live_prefetch_threads() and time.perf_counter() < deadline:
        time.sleep(0.02)
    return live_prefetch_threads()


def test_prefetch_threads_do_not_leak():
    base = live_prefetch_threads()
    pf = Prefetcher(Slow(10**9, ValueError()), capacity=2)
    pf.start()
    next(pf)
    pf.shutdown()
    assert wait_threads_gone() == base
    pf = Prefetcher(Slow(10**9, ValueError()), capacity=2)  # abandoned without shutdown
    pf.start()
    next(pf)
    del pf
    gc.collect()
    assert wait_threads_gone() == base
    from m2m.stream.loader import make_loader

    dl = make_loader(make_source(5000, D), batch_size=16, warm_bytes=1 << 20, hot_bytes=0)
    for i, _ in enumerate(dl):
        if i == 2:
            break
    gc.collect()
    assert wait_threads_gone() == base
    it = iter(dl)
    next(it)
    it2 = iter(dl)  # passes may overlap (zip(dl, dl)): each stops its thread when dropped or closed
    next(it2)
    del it2
    gc.collect()
    assert wait_threads_gone() == base + 1
    dl.close()  # close() stops every live pass
    assert wait_threads_gone() == base
    del it
