"""Augmenters reading their terms shard by shard (``by_shard``, `m2m.augment.tables`) against the
whole-lake augmenters on the same lake: the same draws, tables kept within their budget, terms read
from the row's own shard only, bad terms refused with the shard named."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from m2m import M2MConfig, create_m2m
from m2m.augment.augmenter import LangevinAugmenter, MixtureAugmenter, VMFAugmenter
from m2m.augment.tables import ShardCache, ShardTerms, by_shard
from m2m.errors import ConfigError, InvalidManifestError
from m2m.lake.neighbourhood import SnapshotTerms, has_terms
from m2m.stream import from_lake

N, D = 3000, 48


def _data(n: int = N, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # rows near cluster centres (their neighbours matter: reruns) and rows scattered at random
    # (neighbours far away: the one-component path)
    centres = torch.randn(12, d, generator=g)
    x = centres[torch.randint(0, 12, (n,), generator=g)] + 0.35 * torch.randn(n, d, generator=g)
    scattered = torch.rand(n, generator=g) < 0.5
    x[scattered] = torch.randn(int(scattered.sum()), d, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    x, labels = _data()
    path = tmp_path_factory.mktemp("terms") / "lake"
    with create_m2m(M2MConfig(path=str(path), latent_dim=D, shard_bytes=100_000)) as lk:
        lk.add_splats(x, labels=labels)
        lk.estimate_kappa()
        yield lk


def _whole_and_sharded(lake, mode: str, budget: int):
    snap = lake.snapshot
    whole = from_lake.build_augmenter(lake, mode)
    cfg = lake.config
    terms = SnapshotTerms(snap)
    if mode == "langevin":
        sharded = LangevinAugmenter.by_shard(terms, steps=cfg.langevin_steps, step_size=cfg.langevin_dt,
                                             temperature=cfg.langevin_T, terms_bytes=budget)
    elif mode == "mixture":
        sharded = MixtureAugmenter.by_shard(terms, temperature=cfg.langevin_T, terms_bytes=budget)
    else:
        sharded = VMFAugmenter.by_shard(terms, terms_bytes=budget)
    return whole, sharded


def _table(lake) -> torch.Tensor:
    return torch.from_numpy(lake.snapshot.read_all("mu").astype(np.float32))


def test_sidecars_carry_the_neighbour_terms(lake):
    snap = lake.snapshot
    assert len(snap.manifest.shards) >= 5
    assert has_terms(snap.manifest, lake.config.knn_k)
    kappa, alpha, label = snap.read_all("kappa"), snap.read_all("alpha"), snap.read_all("label")
    nb = snap.read_all("neighbors")
    have = nb >= 0
    got_k = snap.read_all("neighbor_kappa")
    got_a = snap.read_all("neighbor_alpha")
    same = snap.read_all("neighbor_same_label")
    assert np.array_equal(got_k[have], kappa[nb[have]])
    assert np.array_equal(got_a[have], alpha[nb[have]])
    assert np.array_equal(same, have & (label[np.maximum(nb, 0)] == label[:, None]))
    assert same.any() and (~same & have).any()     # both outcomes occur


@pytest.mark.parametrize("mode", ["langevin", "mixture", "vmf"])
def test_by_shard_draws_equal_the_whole_lake_augmenter(lake, mode):
    whole, sharded = _whole_and_sharded(lake, mode, budget=5_000 if mode == "vmf" else 60_000)
    mu = _table(lake)
    gather = mu.index_select
    g = torch.Generator().manual_seed(1)
    offsets = lake.snapshot.shard_offsets
    for b in range(8):
        if b % 4 == 0:
            rows = torch.randperm(N, generator=g)[:300]    # rows of every shard in one batch
        else:                                              # rows of two shards
            s1, s2 = torch.randperm(len(offsets) - 1, generator=g)[:2].tolist()
            pool = torch.cat([torch.arange(int(offsets[s]), int(offsets[s + 1])) for s in (s1, s2)])
            rows = pool[torch.randperm(len(pool), generator=g)[:200]]
        a = whole(mu[rows], rows, lambda r: gather(0, r), torch.Generator().manual_seed(b))
        c = sharded(mu[rows], rows, lambda r: gather(0, r), torch.Generator().manual_seed(b))
        assert torch.equal(a, c), (mode, b)
    if mode == "langevin":   # the comparison covers both paths of the chain
        p = sharded.prepare(rows, D, torch.Generator().manual_seed(0))
        assert 0 < p.fail.numel() < rows.numel()
        assert torch.equal(p.fail, whole.prepare(rows, D, torch.Generator().manual_seed(0)).fail)
    # one call keeps every shard it needs, however small the budget; later calls trim to it
    cache = (sharded._sharded(D) if mode == "langevin" else sharded._by_shard()).cache
    assert cache.builds > len(lake.snapshot.manifest.shards)     # shards were dropped and rebuilt
    one = torch.arange(int(lake.snapshot.shard_offsets[1]))[:50]
    sharded(mu[one], one, lambda r: gather(0, r), torch.Generator().manual_seed(0))
    assert cache.bytes <= max(cache.budget, max(_shard_bytes(cache)))


def _shard_bytes(cache: ShardCache) -> list[int]:
    return [size for _, size in cache._items.values()]


@pytest.mark.parametrize("mode", ["langevin", "mixture", "vmf"])
def test_by_shard_reads_only_the_shards_of_its_rows(lake, mode):
    snap = lake.snapshot
    real = SnapshotTerms(snap)
    asked: list[int] = []

    class Counting:
        shard_offsets, k = real.shard_offsets, real.k

        def terms(self, shard):
            asked.append(shard)
            return real.terms(shard)

        def kappa(self, shard):
            asked.append(shard)
            return real.kappa(shard)

    aug = {"langevin": LangevinAugmenter.by_shard, "mixture": MixtureAugmenter.by_shard,
           "vmf": VMFAugmenter.by_shard}[mode](Counting())
    mu = _table(lake)
    lo, hi = int(snap.shard_offsets[2]), int(snap.shard_offsets[3])
    rows = torch.arange(lo, hi)
    aug(mu[rows], rows, lambda r: mu.index_select(0, r), torch.Generator().manual_seed(0))
    assert asked == [2]


@pytest.mark.parametrize("mode", ["langevin", "mixture", "vmf"])
def test_by_shard_augmenter_pickles(lake, mode):
    whole, sharded = _whole_and_sharded(lake, mode, budget=1 << 20)
    mu = _table(lake)
    rows = torch.arange(0, N, 7)
    sharded.prepare(rows, D, torch.Generator().manual_seed(0))      # tables built before pickling
    copy = pickle.loads(pickle.dumps(sharded))
    a = copy(mu[rows], rows, lambda r: mu.index_select(0, r), torch.Generator().manual_seed(3))
    b = whole(mu[rows], rows, lambda r: mu.index_select(0, r), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _terms(**change) -> ShardTerms:
    n, k = 4, 3
    base = dict(kappa=np.full(n, 50.0, np.float32), alpha=np.ones(n, np.float32),
                neighbors=np.array([[1, 2, -1], [0, 2, 3], [0, 1, 3], [0, 1, 2]]),
                neighbor_cos=np.full((n, k), 0.9, np.float32), neighbor_kappa=np.full((n, k), 50.0, np.float32),
                neighbor_alpha=np.ones((n, k), np.float32), same_label=None)
    base.update(change)
    return ShardTerms(**base)


class _One:
    shard_offsets = np.array([0, 4])
    k = 3

    def __init__(self, t: ShardTerms) -> None:
        self.t = t

    def terms(self, shard):
        return self.t

    def kappa(self, shard):
        return self.t.kappa


@pytest.mark.parametrize("change, words", [
    (dict(kappa=np.array([50.0, np.nan, 50.0, 50.0], np.float32)), "kappa must be finite"),
    (dict(alpha=np.array([1.0, 0.0, 1.0, 1.0], np.float32)), "alpha must be finite"),
    (dict(neighbors=np.array([[1, 2, -1], [0, 2, 9], [0, 1, 3], [0, 1, 2]])), "outside [-1, 4)"),
    (dict(neighbor_kappa=np.array([[50, np.nan, 50]] * 4, np.float32)), "neighbour's kappa or alpha"),
    (dict(neighbor_alpha=np.array([[1, 1, 1], [-1, 1, 1], [1, 1, 1], [1, 1, 1]], np.float32)), "neighbour's kappa"),
    (dict(neighbor_cos=np.zeros((4, 2), np.float32)), "neighbor_cos has shape"),
])
@pytest.mark.parametrize("cls", [LangevinAugmenter, MixtureAugmenter])
def test_bad_terms_are_refused_naming_the_shard(change, words, cls):
    aug = cls.by_shard(_One(_terms(**change)))
    rows = torch.arange(4)
    with pytest.raises(ConfigError, match="shard 0") as err:
        aug.prepare(rows, 8, torch.Generator().manual_seed(0))
    assert words in str(err.value)


def test_absent_neighbours_terms_are_ignored():
    # a neighbour slot that is no component (-1, the row itself, another label) may hold anything
    t = _terms(neighbors=np.array([[0, 2, -1], [0, 2, 3], [0, 1, 3], [0, 1, 2]]),
               neighbor_kappa=np.array([[np.nan, 50, -5]] + [[50, 50, 50]] * 3, np.float32),
               same_label=np.array([[True, True, True], [True, False, True], [True] * 3, [True] * 3]))
    LangevinAugmenter.by_shard(_One(t)).prepare(torch.arange(4), 8, torch.Generator().manual_seed(0))


def test_by_shard_groups_rows():
    offsets = np.array([0, 3, 3, 10])
    rows = torch.tensor([9, 0, 4, 2, 3])
    got = [(s, w.tolist(), loc.tolist()) for s, w, loc in by_shard(rows, offsets)]
    assert got == [(0, [1, 3], [0, 2]), (2, [0, 2, 4], [6, 1, 0])]
    with pytest.raises(ConfigError, match="rows outside"):
        by_shard(torch.tensor([10]), offsets)


def test_cache_keeps_the_call_and_trims_to_budget(caplog):
    built: list[int] = []
    cache = ShardCache(lambda s: (built.append(s), np.zeros(s + 1))[1], lambda a: a.nbytes, budget=24)
    cache.get_many([0, 1])                 # 8 + 16 bytes: within
    cache.get_many([5])                    # 48 bytes alone: kept, the others dropped
    assert list(cache._items) == [5] and cache.bytes == 48 and cache.rebuilds == 0
    with caplog.at_level("WARNING", logger="m2m.augment.tables"):
        cache.get_many([0])
        cache.get_many([1])
    assert list(cache._items) == [0, 1] and built == [0, 1, 5, 0, 1] and cache.peak_bytes == 72
    assert cache.rebuilds == 2
    assert len(caplog.records) == 1 and "shard 0 built again" in caplog.text     # said once


def test_manifest_refuses_terms_outside_a_geometry_sidecar(lake):
    from m2m.lake.manifest import check_layout

    m = lake.manifest
    shard = m.shards[0]
    main, side = shard.files[0], shard.files[-1]
    assert "neighbor_kappa" in side.columns
    bad_main = dataclasses.replace(main, columns=main.columns + ("neighbor_kappa",))
    half = dataclasses.replace(side, columns=tuple(c for c in side.columns if c != "neighbor_alpha"))
    for files in [(bad_main,) + shard.files[1:], shard.files[:-1] + (half,)]:
        broken = dataclasses.replace(m, shards=(dataclasses.replace(shard, files=files),) + tuple(m.shards[1:]))
        with pytest.raises(InvalidManifestError, match="neighbor_"):
            check_layout(broken)


def test_has_terms_needs_every_row_estimated(lake, tmp_path):
    x, labels = _data(400, D, seed=5)
    with create_m2m(M2MConfig(path=str(tmp_path / "l"), latent_dim=D)) as lk:
        lk.add_splats(x[:300], labels=labels[:300])
        lk.estimate_kappa()
        assert has_terms(lk.manifest, lk.config.knn_k)
        assert not has_terms(lk.manifest, lk.config.knn_k + 1)
        lk.add_splats(x[300:], labels=labels[300:])      # rows without sidecars
        assert not has_terms(lk.manifest, lk.config.knn_k)


@pytest.mark.parametrize("mode", ["langevin", "mixture", "vmf"])
@pytest.mark.parametrize("workers", [0, 2])
def test_stream_switches_to_by_shard_above_the_budget(lake, monkeypatch, mode, workers):
    def batches():
        dl = lake.export_to_dataloader(batch_size=256, generate_samples=mode, seed=3, shuffle_mode="block",
                                       shard_affinity=True, num_workers=workers)
        return torch.cat(list(dl)), dl

    whole, dl = batches()
    assert _augment_of(dl)._terms is None
    monkeypatch.setattr(from_lake, "TERMS_BYTES", 10_000)
    sharded, dl = batches()
    assert _augment_of(dl)._terms is not None
    assert torch.equal(whole, sharded)


@pytest.mark.parametrize("shuffle_mode, by_shard", [("full", False), ("block", True), ("auto", False)])
def test_a_full_shuffle_keeps_whole_lake_tables(lake, monkeypatch, shuffle_mode, by_shard):
    # a full shuffle's batches come from every shard: tables by shard would be rebuilt for every batch
    monkeypatch.setattr(from_lake, "TERMS_BYTES", 10_000)
    dl = lake.export_to_dataloader(batch_size=256, generate_samples=True, shuffle_mode=shuffle_mode)
    assert (_augment_of(dl)._terms is not None) is by_shard
    dl = lake.export_to_dataloader(batch_size=256, generate_samples=True, shuffle=False)
    assert _augment_of(dl)._terms is not None


def _augment_of(dl):
    return dl.augment


def test_consolidated_lake_carries_terms(tmp_path):
    x, labels = _data(600, D, seed=2)
    x = torch.cat([x, x[:50] + 1e-4])
    labels = torch.cat([labels, labels[:50]])
    with create_m2m(M2MConfig(path=str(tmp_path / "c"), latent_dim=D)) as lk:
        lk.add_splats(x, labels=labels)
        report = lk.consolidate(similarity=0.999)
        assert report.rows_after < report.rows_before
        snap = lk.snapshot
        assert has_terms(snap.manifest, lk.config.knn_k)
        nb, kappa, alpha = snap.read_all("neighbors"), snap.read_all("kappa"), snap.read_all("alpha")
        have = nb >= 0
        assert np.array_equal(snap.read_all("neighbor_kappa")[have], kappa[nb[have]])
        assert np.array_equal(snap.read_all("neighbor_alpha")[have], alpha[nb[have]])


@pytest.mark.parametrize("shuffle_mode, by_shard", [("block", True), ("full", False)])
def test_a_mixture_of_lakes_augments_each_lake_by_shard(lake, tmp_path, monkeypatch, shuffle_mode, by_shard):
    """m2m.mix builds each lake's augmenter as a one-lake stream would: by shard above the budget when
    the mixture is not fully shuffled, with the same draws as the whole-lake tables."""
    import m2m

    x, labels = _data(900, D, seed=7)
    with create_m2m(M2MConfig(path=str(tmp_path / "other"), latent_dim=D, shard_bytes=100_000)) as other:
        other.add_splats(x, labels=labels)
        other.estimate_kappa()

        def batches():
            mx = m2m.mix({"a": lake, "b": other}, {"a": 0.6, "b": 0.4})
            dl = mx.export_to_dataloader(batch_size=128, generate_samples=True, seed=2, shuffle_mode=shuffle_mode,
                                         columns=("embedding", "source"))
            return torch.cat([b["embedding"] for b in dl]), dl

        whole, dl = batches()
        assert all(a._terms is None for a in dl.augment.augments)
        monkeypatch.setattr(from_lake, "TERMS_BYTES", 10_000)
        sharded, dl = batches()
        assert all((a._terms is not None) is by_shard for a in dl.augment.augments)
        assert torch.equal(whole, sharded)
