"""Invariants of the pure order functions: shuffles, rank partition, worker split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2m.errors import ConfigError
from m2m.stream import partition, shuffle
from m2m.stream.order import (
    Layout,
    check_plan,
    choose_layout,
    epoch_entries,
    rank_epoch,
)
from m2m.stream.topology import World

LAYOUTS = st.sampled_from([("full", 7, 1), ("block", 5, 2), ("block", 16, 3), ("block", 1, 1), ("sequential", 8, 1)])


def reader_rows(layout: Layout, n: int, bs: int, drop_last: bool, seed: int, epoch: int, world_size: int,
                workers: int, chunk: int) -> dict[tuple[int, int], list[np.ndarray]]:
    """Rows each (rank, worker) reads, per batch, via rank_epoch + worker_items."""
    out: dict[tuple[int, int], list[np.ndarray]] = {}
    for rank in range(world_size):
        ep = rank_epoch(layout, n, bs, drop_last, seed, epoch, rank, world_size)
        for w in range(workers):
            batches = []
            for _, first, end in partition.worker_items(ep.num_batches, 0, chunk, w, workers):
                for j in range(first, end):
                    lo, hi = ep.batch_range(j, j + 1)
                    batches.append(ep.rows[lo:hi])
            out[(rank, w)] = batches
    return out


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 300), bs=st.integers(1, 40), world_size=st.integers(1, 8), workers=st.integers(1, 4),
       chunk=st.integers(1, 5), drop_last=st.booleans(), layout=LAYOUTS, seed=st.integers(0, 2**32 - 1))
def test_partition_is_disjoint_complete_and_balanced(n, bs, world_size, workers, chunk, drop_last, layout, seed):
    lay = Layout(*layout)
    parts = reader_rows(lay, n, bs, drop_last, seed, 0, world_size, workers, chunk)
    per_rank = [sum(len(parts[(r, w)]) for w in range(workers)) for r in range(world_size)]
    assert len(set(per_rank)) == 1, f"batch counts differ across ranks: {per_rank}"
    sizes = [[len(b) for w in range(workers) for b in parts[(r, w)]] for r in range(world_size)]
    assert all(sorted(s) == sorted(sizes[0]) for s in sizes), "batch sizes differ across ranks"
    got = np.concatenate([b for bs_ in parts.values() for b in bs_]) if any(parts.values()) else np.zeros(0, int)
    counts = np.bincount(got, minlength=n) if n else np.zeros(0, int)
    if drop_last:
        assert counts.max(initial=0) <= 1, "a row repeats with drop_last"
        assert n - len(got) < world_size * bs, "dropped a whole batch per rank or more"
        assert all(len(b) == bs for b in parts.get((0, 0), []))
    else:
        assert (counts >= 1).all(), "a row is missing from the epoch"
        assert len(got) - n < world_size, f"padding {len(got) - n} >= world_size {world_size}"
        assert counts.max(initial=0) <= 1 + -(-world_size // max(n, 1))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 400), layout=LAYOUTS, seed=st.integers(0, 2**32 - 1))
def test_orders_are_permutations_and_deterministic(n, layout, seed):
    lay = Layout(*layout)
    a, _ = epoch_entries(lay, n, seed, 3)
    b, _ = epoch_entries(lay, n, seed, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(a), np.arange(n))


@pytest.mark.parametrize("layout", [Layout("full", 10, 1), Layout("block", 10, 2)])
def test_epochs_and_seeds_differ(layout):
    n = 500
    e0, _ = epoch_entries(layout, n, 1, 0)
    e1, _ = epoch_entries(layout, n, 1, 1)
    s2, _ = epoch_entries(layout, n, 2, 0)
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, s2)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), block_rows=st.integers(1, 30), window=st.integers(1, 5), seed=st.integers(0, 99))
def test_block_shuffle_windows_are_whole_blocks(n, block_rows, window, seed):
    rng = shuffle.epoch_generator(seed, 0)
    order = shuffle.block_shuffle(np.arange(n), block_rows, window, n, rng)
    blocks = order // block_rows
    num_blocks = -(-n // block_rows)
    sizes = np.bincount(blocks, minlength=num_blocks)
    assert sizes.tolist() == [min(block_rows, n - b * block_rows) for b in range(num_blocks)]
    # walk the order: it must split into windows of `window` whole blocks (the last may hold fewer)
    current: set[int] = set()
    consumed = 0
    for b in blocks.tolist():
        current.add(b)
        consumed += 1
        assert len(current) <= window, "a window mixes more blocks than window_blocks"
        if len(current) == window and consumed == sizes[list(current)].sum():
            current, consumed = set(), 0
    assert consumed == sizes[list(current)].sum() if current else consumed == 0


def test_block_shuffle_mixes_rows_within_a_window():
    n, br, w = 10_000, 100, 10
    order = shuffle.block_shuffle(np.arange(n), br, w, n, shuffle.epoch_generator(0, 0))
    batch = order[:100]
    assert len(np.unique(batch // br)) >= 8  # a batch spans most blocks of its window
    assert len(np.unique(order[: br * w] // br)) == w


@settings(max_examples=100, deadline=None)
@given(nb=st.integers(0, 60), start=st.integers(0, 70), chunk=st.integers(1, 7), workers=st.integers(1, 5))
def test_worker_items_interleave_to_the_rank_order(nb, start, chunk, workers):
    per_worker = [partition.worker_items(nb, start, chunk, w, workers) for w in range(workers)]
    # DataLoader polls workers round-robin, skipping exhausted ones
    merged = []
    cursors = [0] * workers
    while any(c < len(p) for c, p in zip(cursors, per_worker)):
        for w in range(workers):
            if cursors[w] < len(per_worker[w]):
                merged.append(per_worker[w][cursors[w]])
                cursors[w] += 1
    batches = [j for _, first, end in merged for j in range(first, end)]
    assert batches == list(range(min(start, nb), nb))


def test_sampler_plan_is_partitioned_like_rows():
    n = 100
    rng = np.random.default_rng(0)
    plan_rows = rng.integers(0, n, 333)
    weights = rng.uniform(0.5, 2.0, 333).astype(np.float32)
    for lay in (Layout("full", 10, 1), Layout("block", 10, 2)):
        parts = [rank_epoch(lay, n, 16, False, 0, 0, r, 3, (plan_rows, weights)) for r in range(3)]
        assert len({p.num_batches for p in parts}) == 1
        rows = np.concatenate([p.rows for p in parts])
        w = np.concatenate([p.weights for p in parts])
        # the plan's (row, weight) pairs are all there, plus < world_size padding pairs
        pairs = sorted(zip(plan_rows.tolist(), weights.tolist()))
        got = sorted(zip(rows.tolist(), w.tolist()))
        assert len(got) - len(pairs) < 3
        for pair in pairs:
            got.remove(pair)


def test_check_plan_rejects_bad_rows_and_weights():
    with pytest.raises(ValueError, match="outside"):
        check_plan((np.array([0, 5]), np.ones(2)), 5)
    with pytest.raises(ValueError, match="weight"):
        check_plan((np.array([0, 1]), np.array([1.0, np.nan])), 5)
    with pytest.raises(ValueError, match="shape"):
        check_plan((np.array([0, 1]), np.ones(3)), 5)


def test_layout_is_full_when_the_lake_fits_warm_bytes():
    assert choose_layout(1000, 100, 100_000, True).mode == "full"
    lay = choose_layout(1000, 100, 99_999, True, block_rows=10)
    assert lay.mode == "block" and lay.window_blocks == 99_999 // 4 // 1000
    assert choose_layout(1000, 100, 0, False).mode == "sequential"
    with pytest.raises(ConfigError):
        choose_layout(10, 1, 1, True, mode="bogus")


def test_world_validates_and_covers_8_ranks_x_4_workers():
    with pytest.raises(ConfigError):
        World(rank=2, world_size=2)
    with pytest.raises(ConfigError):
        World(worker=4, num_workers=4)
    parts = reader_rows(Layout("full", 8, 1), 1000, 10, False, 0, 0, 8, 4, 2)
    rows = np.concatenate([b for v in parts.values() for b in v])
    assert len(rows) == 1000 and len(np.unique(rows)) == 1000
