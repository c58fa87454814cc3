"""Shard affinity: disjoint shards per rank, exact coverage, equal batch counts (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from m2m.stream import affinity, order, partition


def _offsets(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


SIZES = [97, 120, 64, 120, 120, 33, 120, 120, 101, 120, 120, 7, 120, 88, 120, 120]
LAYOUT = order.Layout("block", 16, 3)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_cover_the_epoch_exactly_with_equal_batches(world, drop_last):
    offsets = _offsets(SIZES)
    n = int(offsets[-1])
    parts = [affinity.rank_epoch(LAYOUT, offsets, 32, drop_last, 7, 3, r, world) for r in range(world)]
    assert len({p.num_batches for p in parts}) == 1
    assert len({len(p.rows) for p in parts}) == 1
    rows = np.concatenate([p.rows for p in parts])
    counts = np.bincount(rows, minlength=n)
    if drop_last:
        assert counts.max() == 1 and n - counts.sum() < world * 32
    else:
        assert counts.min() == 1 and counts.sum() - n < world    # fewer than W padding rows


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_its_own_shards(world):
    offsets = _offsets(SIZES)
    parts = [affinity.rank_epoch(LAYOUT, offsets, 32, False, 7, 0, r, world) for r in range(world)]
    shard_sets = [set(affinity.shards_of(p.rows, offsets).tolist()) for p in parts]
    touched = sum(len(s) for s in shard_sets)
    assert touched <= len(SIZES) + 2 * world                     # only boundary shards are shared
    plain = [order.rank_epoch(LAYOUT, int(offsets[-1]), 32, False, 7, 0, r, world) for r in range(world)]
    plain_touched = sum(len(affinity.shards_of(p.rows, offsets)) for p in plain)
    assert plain_touched > touched


def test_shards_rotate_across_epochs_and_the_order_is_deterministic():
    offsets = _offsets(SIZES)
    e0 = affinity.rank_epoch(LAYOUT, offsets, 32, False, 7, 0, 0, 4)
    e1 = affinity.rank_epoch(LAYOUT, offsets, 32, False, 7, 1, 0, 4)
    again = affinity.rank_epoch(LAYOUT, offsets, 32, False, 7, 0, 0, 4)
    np.testing.assert_array_equal(e0.rows, again.rows)
    assert set(affinity.shards_of(e0.rows, offsets).tolist()) != set(affinity.shards_of(e1.rows, offsets).tolist())


def test_rows_are_shuffled_within_windows_of_the_rank():
    offsets = _offsets(SIZES)
    p = affinity.rank_epoch(LAYOUT, offsets, 32, False, 7, 0, 1, 2)
    assert not np.all(np.diff(p.rows) > 0)                       # not sequential
    assert len(np.unique(p.rows // LAYOUT.block_rows)) > LAYOUT.window_blocks


def test_importance_plan_entries_and_weights_follow_the_affinity_order():
    offsets = _offsets(SIZES)
    n = int(offsets[-1])
    g = np.random.default_rng(0)
    rows = g.integers(0, n, 3 * n)
    weights = (rows % 13).astype(np.float32) + 1
    parts = [affinity.rank_epoch(LAYOUT, offsets, 32, True, 7, 2, r, 3, (rows, weights)) for r in range(3)]
    for p in parts:
        np.testing.assert_array_equal(p.weights, (p.rows % 13).astype(np.float32) + 1)
    got = np.concatenate([p.rows for p in parts])
    per = partition.rows_per_rank(len(rows), 32, 3, True)
    assert len(got) == 3 * per
    assert np.all(np.isin(got, rows))
    counts_all = np.bincount(rows, minlength=n)
    assert np.all(np.bincount(got, minlength=n) <= counts_all)   # a draw, not more than drawn


def test_loader_switch():
    from m2m.errors import ConfigError
    from m2m.stream.loader import make_loader
    from m2m.stream.source import ArraySource

    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    src = ArraySource({"mu": x, "id": np.arange(2000)}, shard_rows=300)
    kw = dict(batch_size=50, warm_bytes=1 << 20, hot_bytes=0, world_size=2, prefetch=0)
    dl = make_loader(src, rank=0, shard_affinity=True, shuffle_mode="block", block_rows=25, **kw)
    assert dl.spec.shard_affinity and dl.state_dict()["shard_affinity"] is True
    rows0 = np.concatenate([b["id"].numpy() for b in make_loader(
        src, rank=0, shard_affinity=True, shuffle_mode="block", block_rows=25, columns=["id", "embedding"], **kw)])
    rows1 = np.concatenate([b["id"].numpy() for b in make_loader(
        src, rank=1, shard_affinity=True, shuffle_mode="block", block_rows=25, columns=["id", "embedding"], **kw)])
    assert np.array_equal(np.sort(np.concatenate([rows0, rows1])), np.arange(2000))
    assert not make_loader(src, rank=0, shuffle_mode="block", block_rows=25, **kw).spec.shard_affinity  # local
    with pytest.raises(ConfigError, match="shard_affinity"):
        make_loader(src, rank=0, shard_affinity=True, shuffle_mode="full", **kw)


@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_only_path_equals_the_grouped_whole_epoch(drop_last):
    offsets = _offsets(SIZES)
    n = int(offsets[-1])
    for world in (1, 3, 4):
        for r in range(world):
            fast = affinity.rank_epoch(LAYOUT, offsets, 32, drop_last, 5, 2, r, world)
            whole = affinity.rank_epoch(LAYOUT, offsets, 32, drop_last, 5, 2, r, world,
                                        (np.arange(n), np.ones(n, np.float32)))
            np.testing.assert_array_equal(fast.rows, whole.rows)
            assert fast.num_batches == whole.num_batches


def test_group_shuffle_keeps_each_shard_in_one_group():
    g = np.random.default_rng(3)
    rows = np.arange(10_000, dtype=np.int64)                 # a rank's rows, grouped by shard
    idx = affinity.group_shuffle(rows, 10, 4, 40, g)
    assert np.array_equal(np.sort(idx), np.arange(10_000))   # a permutation
    out = rows[idx]
    # groups of 40 blocks (400 rows) are read one after another: each 400-row stretch of the output
    # holds rows of one group only
    groups = out // 400
    assert np.all(groups.reshape(-1, 400) == groups.reshape(-1, 400)[:, :1])
    assert len(np.unique(groups.reshape(-1, 400)[:, 0])) == 25
    assert not np.all(np.diff(out) > 0)
    whole = affinity.group_shuffle(rows, 10, 4, None, np.random.default_rng(3))
    assert len(np.unique(rows[whole][:400] // 400)) > 1     # one group: windows span the rank's rows


def test_loader_groups_follow_the_node_cache_budget():
    from m2m.stream.loader import make_loader
    from m2m.stream.source import ArraySource

    class Remote(ArraySource):
        is_remote = True
        open_bytes_limit = 1 << 18              # 81.92 blocks of 100 rows x 8 float32 ...

        def prefetch_shards(self, shards):
            return 0

        def plan_prefetch(self, shards):
            pass

        fs = None  # the rest of the FileBackedSource protocol: no shard files behind these arrays

        def column_extent(self, shard, name):
            return None

        def fetch_stats(self):
            return None

    x = np.random.default_rng(0).standard_normal((20_000, 8)).astype(np.float32)
    src = Remote({"mu": x}, shard_rows=1000)
    dl = make_loader(src, batch_size=50, warm_bytes=1 << 16, hot_bytes=0, shuffle_mode="block", block_rows=100,
                     rank=0, world_size=1, prefetch=0)
    assert dl.spec.shard_affinity
    assert dl.spec.affinity_group_blocks == max(dl.spec.layout.window_blocks, 40)   # half the cache
    rows = np.concatenate([b.numpy() for b in dl])
    assert rows.shape == (20_000, 8)


def test_a_state_carries_the_affinity_group_to_a_process_whose_cache_budget_differs():
    # the group follows the node cache's budget, which (from free disk space) may differ a little
    # between the saving process and the resuming one: the resumed loader adopts the saved group
    from m2m.stream.loader import make_loader
    from m2m.stream.source import ArraySource

    def remote(limit):
        class Remote(ArraySource):
            is_remote = True
            open_bytes_limit = limit
            fs = None

            def plan_prefetch(self, shards):
                pass

            def prefetch_shards(self, shards):
                return 0

            def column_extent(self, shard, name):
                return None

            def fetch_stats(self):
                return None

        x = np.arange(20_000 * 8, dtype=np.float32).reshape(20_000, 8)
        return Remote({"mu": x}, shard_rows=1000)

    kw = dict(batch_size=50, warm_bytes=1 << 16, hot_bytes=0, shuffle_mode="block", block_rows=100, prefetch=0)
    first = make_loader(remote(1 << 18), **kw)
    full = [b[:, 0].tolist() for b in first]
    first = make_loader(remote(1 << 18), **kw)
    it = iter(first)
    [next(it) for _ in range(7)]
    state = first.state_dict()
    other = make_loader(remote(1 << 20), **kw)
    assert other.spec.affinity_group_blocks != state["affinity_group_blocks"]
    other.load_state_dict(state)
    assert [b[:, 0].tolist() for b in other] == full[7:]


def _lakes():
    rng = np.random.default_rng(11)
    yield np.full(59, 406)                                      # the remote test's lake: 1-4 shards per run
    yield np.full(400, 50)                                      # many shards per run: runs of equal rows
    yield rng.integers(64, 500, 97)                             # uneven shards (appends of any size)
    yield np.concatenate([np.full(30, 300), np.full(30, 70)])   # big then small shards: very uneven runs
    yield np.array([500, 64, 64, 64, 500, 64, 64, 64, 64])      # fewer shards than runs


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_a_rank_reads_at_most_its_share_plus_extra_shards_bound(world):
    # observed: a 4-rank remote epoch read 11.3 biggest shards beyond lake/W (the docstring said at most
    # 2 * RUNS_PER_RANK + 2 = 10); the bound is now derived from the runs (affinity.extra_shards_bound)
    worst = 0.0
    for sizes in _lakes():
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        biggest, share = int(sizes.max()), offsets[-1] / world
        for drop_last in (False, True):
            bound = affinity.extra_shards_bound(offsets, world, drop_last)
            for block_rows in sorted({1, 16, int(sizes.min())}):
                layout = order.Layout("block", block_rows, 4)
                for epoch in range(8):
                    for r in range(world):
                        e = affinity.rank_epoch(layout, offsets, 32, drop_last, 3, epoch, r, world)
                        read = int(sizes[affinity.block_shards(e.rows, block_rows, offsets)].sum())
                        worst = max(worst, (read - share) / biggest / bound)
                        assert read <= share + bound * biggest, (list(sizes[:3]), drop_last, block_rows, epoch, r)
    print(f"world {world}: worst rank at {worst:.2f} of the bound")
    assert worst > 0.3 or world == 1  # the bound is not vacuous: some rank comes within a third of it


def test_block_shards_loads_every_shard_a_block_covers():
    offsets = np.array([0, 5, 7, 8, 20], dtype=np.int64)        # shards of 5, 2, 1 and 12 rows
    assert affinity.block_shards(np.array([9]), 10, offsets).tolist() == [0, 1, 2, 3]   # block 0..9
    assert affinity.block_shards(np.array([19]), 10, offsets).tolist() == [3]
    assert affinity.block_shards(np.array([4]), 5, offsets).tolist() == [0]
    assert affinity.block_shards(np.array([6, 12]), 4, offsets).tolist() == [0, 1, 2, 3]  # rows 4..7, 12..15
