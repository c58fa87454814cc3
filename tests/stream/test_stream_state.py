"""Issue 17: one resume state. Rank-agnostic (any rank's state resumes every rank at its own next unseen
batch), names its lake and snapshot, refuses with one line what it cannot resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from m2m import M2MConfig, StreamOptions, create_m2m
from m2m.errors import StateMismatchError

N, D, BS = 2000, 8, 100


def make_lake(seed: int = 0, n: int = N):
    lake = create_m2m(M2MConfig(latent_dim=D))
    lake.add_splats(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)))
    return lake


@pytest.fixture
def lake():
    with make_lake() as lake:
        yield lake


def ids(batches) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


def loader(lake, **kw):
    return lake.export_to_dataloader(batch_size=BS, columns=("id",), **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_zeros_state_resumes_every_rank_at_its_own_next_batch(lake, workers):
    # what Lightning DDP does: it saves rank 0's loader state only and loads it on every rank
    k = 4
    saved = loader(lake, rank=0, world_size=2)
    it = iter(saved)
    [next(it) for _ in range(k)]
    state = saved.state_dict()
    for rank in (0, 1):
        reference = ids(loader(lake, rank=rank, world_size=2))
        resumed = loader(lake, rank=rank, world_size=2, num_workers=workers)
        resumed.load_state_dict(state)
        assert ids(resumed) == reference[k:], f"rank {rank}"
        assert ids(resumed) == ids(loader(lake, rank=rank, world_size=2, epoch=1))  # then the next epoch


def test_a_position_past_the_end_of_the_epoch_is_refused(lake):
    dl = loader(lake)
    state = dl.state_dict()
    state["batches_yielded"] = len(dl) + 400
    with pytest.raises(StateMismatchError, match=r"outside epoch 0") as info:
        loader(lake).load_state_dict(state)
    assert "\n" not in str(info.value)


def test_a_mid_epoch_state_from_another_lake_is_refused(lake):
    dl = loader(lake)
    list(itertools.islice(dl, 3))
    with make_lake(seed=1) as other:  # same row count, same everything but the rows
        with pytest.raises(StateMismatchError, match="from lake .* this loader streams lake"):
            loader(other).load_state_dict(dl.state_dict())


def test_an_end_of_epoch_state_resumes_a_grown_lake_at_the_next_epoch(lake):
    dl = loader(lake)
    assert len(list(dl)) == N // BS
    state = dl.state_dict()
    assert (state["epoch"], state["batches_yielded"]) == (1, 0)
    mid = loader(lake)
    list(itertools.islice(mid, 3))
    mid_state = mid.state_dict()
    lake.add_splats(torch.randn(500, D))
    grown = loader(lake)
    grown.load_state_dict(state)
    assert grown.epoch == 1
    seen = ids(grown)
    assert sorted(i for b in seen for i in b) == sorted(lake.snapshot.ids().tolist())
    with pytest.raises(StateMismatchError, match=r"mid-epoch on snapshot version 1 \(2000 rows\).*version 2"):
        loader(lake).load_state_dict(mid_state)


def test_an_end_of_epoch_state_saved_as_the_last_batch_resumes_at_the_next_epoch(lake):
    dl = loader(lake)
    state = dl.state_dict()
    state["batches_yielded"] = len(dl)  # saved right after the last batch, before the next pass began
    restored = loader(lake)
    restored.load_state_dict(state)
    assert restored.epoch == 1 and ids(restored) == ids(loader(lake, epoch=1))


def test_a_mid_epoch_state_from_another_world_size_names_both_sizes(lake):
    dl = loader(lake, rank=0, world_size=2)
    list(itertools.islice(dl, 2))
    with pytest.raises(StateMismatchError, match="world_size=2.*world_size=4") as info:
        loader(lake, rank=0, world_size=4).load_state_dict(dl.state_dict())
    assert "\n" not in str(info.value)
    boundary = loader(lake, rank=0, world_size=2).state_dict()  # an epoch boundary re-plans on any world size
    other = loader(lake, rank=3, world_size=4)
    other.load_state_dict(boundary)
    assert ids(other) == ids(loader(lake, rank=3, world_size=4))


def test_the_state_names_its_lake_and_snapshot(lake):
    state = loader(lake).state_dict()
    assert state["lake"] and state["version"] == lake.version and state["num_rows"] == N
    assert state["samples_seen"] == 0 and state["state_version"] == 2


def test_options_object_and_keywords_are_one_source(lake):
    opts = StreamOptions(batch_size=BS, columns=("id",), shuffle=False)
    a = lake.export_to_dataloader(options=opts)
    b = lake.export_to_dataloader(batch_size=BS, columns=("id",), shuffle=False)
    assert ids(a) == ids(b) and a.batch_size == BS and a.options == b.options
    c = lake.export_to_dataloader(options=opts, batch_size=50)  # a keyword overrides the object
    assert c.batch_size == 50 and c.options.shuffle is False
    assert np.array_equal(np.concatenate(ids(c)), np.arange(N))
    with pytest.raises(ValueError, match="unknown stream option"):
        lake.export_to_dataloader(options=opts, batch_sise=3)
    with pytest.raises(ValueError, match="batch_size"):
        StreamOptions(batch_size=0)
    with pytest.raises(ValueError, match="StreamOptions"):
        lake.export_to_dataloader(options={"batch_size": 3})


def test_a_block_shuffle_window_narrower_than_a_shard_warns_once(caplog):
    from m2m.stream.loader import make_loader
    from m2m.stream.source import ArraySource

    source = ArraySource({"mu": np.zeros((20_000, D), np.float32)}, shard_rows=10_000)
    with caplog.at_level("WARNING", logger="m2m.stream.spec"):
        make_loader(source, batch_size=BS, shuffle_mode="block", block_rows=100, warm_bytes=1 << 16)
    warned = [r for r in caplog.records if "block shuffle" in r.getMessage()]
    assert len(warned) == 1 and "raise warm_bytes" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="m2m.stream.spec"):
        make_loader(source, batch_size=BS, shuffle_mode="block", block_rows=1000, warm_bytes=1 << 30)
    assert not [r for r in caplog.records if "block shuffle" in r.getMessage()]
