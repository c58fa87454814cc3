"""Issue 21: rank-local epoch orders (a rank builds only its own share of the order) and the next
epoch's plan computed in the background while the current one streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m import M2MConfig, create_m2m
from m2m.stream import order, partition, shuffle
from m2m.stream.order import Layout
from m2m.stream.topology import World

N, D, BS = 2000, 8, 64


@pytest.mark.parametrize("n", [1, 2, 3, 17, 256, 1000, 65_537])
def test_feistel_is_a_keyed_bijection_of_any_range(n):
    keys = shuffle.permutation_keys(1, 2, 3)
    out = shuffle.feistel_permute(np.arange(n), n, keys)
    assert np.array_equal(np.sort(out), np.arange(n))
    assert np.array_equal(out, shuffle.feistel_permute(np.arange(n), n, keys))       # deterministic
    half = shuffle.feistel_permute(np.arange(n // 2, n), n, keys)                       # any slice alone
    assert np.array_equal(half, out[n // 2:])
    if n >= 256:
        other = shuffle.feistel_permute(np.arange(n), n, shuffle.permutation_keys(1, 3, 3))
        assert (other != out).mean() > 0.9 and (out != np.arange(n)).mean() > 0.9


def test_feistel_rejects_positions_outside_the_range():
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        shuffle.feistel_permute(np.array([10]), 10, shuffle.permutation_keys(0, 0, 0))


@pytest.mark.parametrize("n,block_rows,window", [(1000, 7, 3), (1000, 1000, 1), (999, 10, 200), (5, 2, 1)])
def test_block_order_by_window_is_a_permutation_of_whole_block_windows(n, block_rows, window):
    lay = Layout(shuffle.BLOCK, block_rows, window)
    rows = order.local_rows(lay, n, 5, 1, np.arange(n))
    assert np.array_equal(np.sort(rows), np.arange(n))
    blocks, starts = shuffle.window_table(n, block_rows, window, shuffle.epoch_generator(5, 1, order._SALT_LOCAL))
    for w in range(len(starts) - 1):  # each window is exactly the rows of its blocks
        mine = blocks[w * window:(w + 1) * window]
        expect = np.sort(np.concatenate([np.arange(b * block_rows, min((b + 1) * block_rows, n)) for b in mine]))
        assert np.array_equal(np.sort(rows[starts[w]:starts[w + 1]]), expect)
    # any slice of positions is built alone, identically
    assert np.array_equal(order.local_rows(lay, n, 5, 1, np.arange(n // 3, n)), rows[n // 3:])
    assert not np.array_equal(order.local_rows(lay, n, 5, 2, np.arange(n)), rows)


@pytest.mark.parametrize("mode", [shuffle.FULL, shuffle.BLOCK, shuffle.SEQUENTIAL])
@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_local_orders_cover_the_epoch_exactly(mode, world, drop_last):
    n, lay = 1003, Layout(mode, 16, 4)
    parts = [order.rank_epoch(lay, n, 10, drop_last, 7, 2, r, world, local=True) for r in range(world)]
    assert len({p.num_batches for p in parts}) == 1
    rows = np.concatenate([p.rows for p in parts])
    counts = np.bincount(rows, minlength=n)
    if drop_last:
        assert counts.max() == 1 and n - counts.sum() < world * 10
    else:
        assert counts.min() == 1 and counts.sum() - n < world
    # the same positions as the whole-epoch order built by one process
    whole = order.local_rows(lay, n, 7, 2, np.arange(n))
    for r, p in enumerate(parts):
        pos = partition.rank_positions(n, 10, r, world, drop_last)
        assert np.array_equal(p.rows, whole[pos])


def test_small_lakes_keep_the_whole_epoch_orders():
    lay = Layout(shuffle.FULL, 16, 4)
    assert not order.rank_local(N) and order.rank_local(order.RANK_LOCAL_ROWS)
    assert np.array_equal(order.rank_epoch(lay, N, BS, False, 0, 0, 0, 1).rows,
                          order.epoch_entries(lay, N, 0, 0)[0])


@pytest.fixture
def local_orders(monkeypatch):
    monkeypatch.setattr(order, "RANK_LOCAL_ROWS", 1)  # the loaders below use the rank-local orders
    with create_m2m(M2MConfig(latent_dim=D)) as lake:
        lake.add_splats(torch.randn(N, D, generator=torch.Generator().manual_seed(0)))
        yield lake


def ids(batches) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


def make(lake, **kw):
    return lake.export_to_dataloader(batch_size=BS, columns=("id",), **kw)


@pytest.mark.parametrize("mode,warm", [("full", None), ("block", 64 * 1024)])
@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_with_rank_local_orders_cover_and_resume(local_orders, mode, warm, workers):
    lake = local_orders
    kw = {"shuffle_mode": mode} if warm is None else {"shuffle_mode": mode, "warm_bytes": warm, "block_rows": 50}
    first = make(lake, **kw)
    assert first.spec.rank_local_order
    for world in (1, 3):
        per_rank = [ids(make(lake, rank=r, world_size=world, **kw)) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1
        seen = np.concatenate([np.concatenate(p) for p in per_rank])
        assert set(seen.tolist()) == set(range(N)) and len(seen) - N < world
    reference = ids(make(lake, rank=1, world_size=3, **kw))
    assert ids(make(lake, rank=1, world_size=3, num_workers=workers, **kw)) == reference
    saved = make(lake, rank=1, world_size=3, **kw)
    it = iter(saved)
    [next(it) for _ in range(3)]
    state = saved.state_dict()
    resumed = make(lake, rank=1, world_size=3, num_workers=workers, **kw)
    resumed.load_state_dict(state)
    assert ids(resumed) == reference[3:]


def test_the_next_epochs_plan_is_computed_while_the_epoch_streams(local_orders):
    dl = make(local_orders)
    ds = dl.dataset
    first = ids(dl)
    key = (1, 0, 1)
    assert key in ds._ahead or key in ds._cache                        # started during epoch 0
    ahead = ds._ahead[key].result(timeout=60) if key in ds._ahead else ds._cache[key]
    assert np.array_equal(ahead.rows, ds.compute_epoch(1, World()).rows)  # the same pure function
    second = ids(dl)
    assert second != first and sorted(sum(second, [])) == sorted(sum(first, []))
    assert np.array_equal(np.concatenate(second), ds.rank_epoch(1, World()).rows)  # ids = rows here
    dl.close()
    assert ds._ahead == {} and dl._plans is None                       # cancelled and released


def test_a_plan_computed_ahead_raises_its_error_in_the_pass_that_needs_it(local_orders, monkeypatch):
    dl = make(local_orders)
    ds = dl.dataset
    calls = []
    real = ds.compute_epoch

    def failing(epoch, world):
        calls.append(epoch)
        if epoch == 1:
            raise RuntimeError("plan of epoch 1 failed")
        return real(epoch, world)

    monkeypatch.setattr(ds, "compute_epoch", failing)
    ids(dl)
    with pytest.raises(RuntimeError, match="epoch 1 failed"):
        ids(dl)
    assert calls.count(1) == 1
    dl.close()
