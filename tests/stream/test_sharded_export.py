"""Issue 21: `export_to_dataloader(importance_sampling=...)` on a lake of `RANK_LOCAL_ROWS` rows or more
draws its plan shard by shard (`m2m.sampling.lake_scores`): no whole-lake scores, alpha or plan in a
process, and with shard affinity (the default there, under a block shuffle) only the rank's shards'
draws. The threshold is lowered here so small lakes take that path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import m2m
from m2m import M2MConfig, create_m2m
from m2m.errors import ConfigError
from m2m.sampling import lake_scores
from m2m.sampling.samplers import ImportanceSampler, LossSampler
from m2m.sampling.sharded import ShardedImportance, ShardedLoss, shard_masses
from m2m.stream import affinity, order
from m2m.stream.order import delivered_draws

D, BS, PARTS, PART_ROWS = 8, 32, 6, 150
N = PARTS * PART_ROWS
BLOCK = {"shuffle_mode": "block", "warm_bytes": 64 * 1024, "block_rows": 25}


@pytest.fixture(scope="module")
def lake_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "lake"
    gen = torch.Generator().manual_seed(0)
    with create_m2m(M2MConfig(latent_dim=D, path=str(path))) as lake:
        for p in range(PARTS):   # one shard per append; clustered so kappa varies
            centre = torch.randn(1, D, generator=gen)
            x = centre + (0.2 + 0.3 * p) * torch.randn(PART_ROWS, D, generator=gen)
            rng = np.random.default_rng(p)
            lake.add_splats(x, labels=rng.integers(0, 3, PART_ROWS), alpha=rng.uniform(0.5, 2.0, PART_ROWS),
                            metadata={"score": rng.gamma(1.0, 1.0, PART_ROWS),
                                      "flag": rng.integers(0, 2, PART_ROWS).astype(bool)})
        lake.estimate_kappa()
    return path


@pytest.fixture
def lake(lake_path, monkeypatch):
    monkeypatch.setattr(order, "RANK_LOCAL_ROWS", 1)
    with m2m.open_lake(str(lake_path)) as lk:
        yield lk


def epoch(dl):
    rows, weights = [], []
    for b in dl:
        rows.append(b["id"].numpy())
        weights.append(b["weight"].numpy())
    return np.concatenate(rows), np.concatenate(weights)


def make(lake, **kw):
    return lake.export_to_dataloader(batch_size=BS, columns=("id", "weight"), seed=3, **kw)


@pytest.mark.parametrize("mode", ["kappa", "alpha", "score"])
def test_the_sharded_scores_are_the_whole_lake_samplers(lake, mode):
    """Read shard by shard (medians from a sample that here covers the lake), the scores and alpha are
    exactly those of the whole-lake sampler built below the threshold, so the plans have the same law."""
    dl = make(lake, importance_sampling=mode, **BLOCK)
    sampler = dl.dataset.sampler
    assert isinstance(sampler, ShardedImportance)
    snap = lake.snapshot
    whole = ImportanceSampler(mode, alpha=snap.read_all("alpha").astype(np.float64),
                              kappa=snap.read_all("kappa") if mode == "kappa" else None,
                              column=snap.read_all("score") if mode == "score" else None)
    offsets = snap.shard_offsets
    scores = np.concatenate([sampler._scores(s) for s in range(len(offsets) - 1)])
    np.testing.assert_array_equal(scores, whole.scores(0))
    np.testing.assert_array_equal(np.concatenate([sampler.alpha_of(s) for s in range(len(offsets) - 1)]),
                                  whole.alpha)


def test_a_kappa_fill_and_floor_from_a_shard_sample(lake_path, monkeypatch):
    """Above `SAMPLE_ROWS` the medians come from whole shards spread over the lake, the same on every
    rank; the scores then use those values (checked against the formula)."""
    monkeypatch.setattr(order, "RANK_LOCAL_ROWS", 1)
    monkeypatch.setattr(lake_scores, "SAMPLE_ROWS", 2 * PART_ROWS)
    with m2m.open_lake(str(lake_path)) as lk:
        snap = lk.snapshot
        picked = lake_scores.sample_shards(snap.shard_offsets, 2 * PART_ROWS)
        assert picked.tolist() == [0, 5]                               # ends of the lake, >= the rows asked
        fill, low = lake_scores.kappa_medians(snap, D, 2 * PART_ROWS)
        kappa = np.concatenate([snap.column(s, "kappa") for s in (0, 5)]).astype(np.float64)
        assert low == pytest.approx(0.1 * np.median(kappa)) and fill == pytest.approx(np.median(kappa), rel=1e-6)
        s = lake_scores.sharded_importance(snap, "kappa", 0, D)
        k3 = snap.column(3, "kappa").astype(np.float64)
        np.testing.assert_array_equal(s._scores(3), 1.0 / np.maximum(k3, low))


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_draw_their_own_shards_and_together_the_whole_plan(lake, workers):
    """Shard affinity is on by default: each rank's epoch is `rank_epoch_sharded` over the lake's shards
    (only its shards' draws), the ranks are disjoint in shards, and together they deliver the epoch's
    draws with weights alpha / (M p)."""
    per_rank = [make(lake, importance_sampling="kappa", rank=r, world_size=2, num_workers=workers, **BLOCK)
                for r in range(2)]
    assert all(dl.spec.shard_affinity for dl in per_rank)
    got = [epoch(dl) for dl in per_rank]
    sampler = per_rank[0].dataset.sampler
    offsets = lake.snapshot.shard_offsets
    m = delivered_draws(N, BS, 2, False)
    for r, (rows, weights) in enumerate(got):
        spec = per_rank[r].spec
        want = affinity.rank_epoch_sharded(spec.layout, offsets, BS, False, 3, 0, r, 2, sampler, m,
                                           spec.affinity_group_blocks or None)
        np.testing.assert_array_equal(rows, want.rows)                 # ids = positions on this lake
        np.testing.assert_array_equal(weights, want.weights)
    shards = [set(np.searchsorted(offsets, rows, side="right").tolist()) for rows, _ in got]
    assert len(shards[0] & shards[1]) <= 2                             # a run's boundary shard at most
    counts = sampler.shard_counts(0, m)
    total = np.bincount(np.searchsorted(offsets, np.concatenate([g[0] for g in got]), side="right") - 1,
                        minlength=len(counts))
    assert total.sum() >= m - 2 and np.all(total <= counts + 2)       # padding: fewer than world rows


def test_mid_epoch_resume_and_the_next_epoch(lake):
    reference = make(lake, importance_sampling="alpha", **BLOCK)
    first, second = epoch(reference), epoch(reference)
    assert not np.array_equal(first[0], second[0])
    saved = make(lake, importance_sampling="alpha", **BLOCK)
    it = iter(saved)
    [next(it) for _ in range(5)]
    state = saved.state_dict()
    resumed = make(lake, importance_sampling="alpha", **BLOCK)
    resumed.load_state_dict(state)
    rows, weights = epoch(resumed)
    np.testing.assert_array_equal(rows, first[0][5 * BS:])
    np.testing.assert_array_equal(weights, first[1][5 * BS:])
    np.testing.assert_array_equal(epoch(resumed)[0], second[0])


def test_weighted_estimates_are_unbiased(lake):
    """sum(w f) over an epoch estimates the alpha-weighted sum of f, on the stream's own draws."""
    snap = lake.snapshot
    alpha = snap.read_all("alpha").astype(np.float64)
    f = np.cos(np.arange(N) / 7.0)
    target = float(np.sum(alpha * f))
    dl = make(lake, importance_sampling="kappa", drop_last=False, **BLOCK)
    est = []
    for _ in range(60):
        rows, w = epoch(dl)
        est.append(float(np.sum(w * f[rows])) * N / delivered_draws(N, BS, 1, False))
    assert abs(np.mean(est) - target) < 4 * np.std(est) / np.sqrt(len(est)) + 1e-6 * abs(target)


def test_what_keeps_the_whole_lake_sampler(lake_path, lake, monkeypatch):
    # a full shuffle keeps the sharded sampler (its whole-epoch plan: the lake fits the warm budget)
    dl = make(lake, importance_sampling="kappa", shuffle_mode="full")
    assert isinstance(dl.dataset.sampler, ShardedImportance) and not dl.spec.shard_affinity
    rows, _ = epoch(dl)
    assert len(rows) == N
    # shard_affinity=False is respected under a block shuffle
    dl = make(lake, importance_sampling="kappa", shard_affinity=False, **BLOCK)
    assert not dl.spec.shard_affinity and len(epoch(dl)[0]) == N
    # below the threshold: the whole-lake sampler, as before
    monkeypatch.setattr(order, "RANK_LOCAL_ROWS", 10 * N)
    assert type(make(lake, importance_sampling="kappa", **BLOCK).dataset.sampler) is ImportanceSampler
    assert type(make(lake, importance_sampling="loss", **BLOCK).dataset.sampler) is LossSampler


def test_rows_appended_after_estimate_kappa_keep_the_whole_lake_path(lake_path, tmp_path, monkeypatch):
    """A shard without geometry: the kappa mode needs the in-memory estimate (as below the threshold)."""
    import shutil

    monkeypatch.setattr(order, "RANK_LOCAL_ROWS", 1)
    copy = tmp_path / "lake"
    shutil.copytree(lake_path, copy)
    with m2m.open_lake(str(copy)) as lk:
        lk.add_splats(torch.randn(40, D), labels=np.zeros(40, int), metadata={"score": np.ones(40),
                                                                              "flag": np.ones(40, bool)})
        assert type(make(lk, importance_sampling="kappa", **BLOCK).dataset.sampler) is ImportanceSampler
        assert isinstance(make(lk, importance_sampling="alpha", **BLOCK).dataset.sampler, ShardedImportance)


def test_a_bool_column_is_refused_naming_it(lake):
    with pytest.raises(ConfigError, match="'flag' is not numeric"):
        epoch(make(lake, importance_sampling="flag", **BLOCK))


def test_the_sampler_pickles_with_its_masses(lake):
    import pickle

    sampler = make(lake, importance_sampling="kappa", **BLOCK).dataset.sampler
    q = sampler.masses()
    copy = pickle.loads(pickle.dumps(sampler))
    np.testing.assert_array_equal(copy._masses[0], q[0])
    np.testing.assert_array_equal(copy.shard_draws(1, 2, 50, 900)[0], sampler.shard_draws(1, 2, 50, 900)[0])


def test_shard_masses_equal_the_two_pass_masses():
    rng = np.random.default_rng(1)
    offsets = np.array([0, 0, 7, 7, 40, 41, 100, 100], dtype=np.int64)   # empty shards too
    scores = rng.gamma(0.3, 1.0, 100)
    scores[10:20] = 0.0
    want = ShardedImportance.from_arrays(offsets, scores, np.ones(100)).masses()
    q, mean = shard_masses(scores, offsets, 0.1)
    assert mean == pytest.approx(want[1])
    np.testing.assert_array_equal(q, want[0])                          # the same float64 operations
    q, _ = shard_masses(np.zeros(100), offsets, 0.1)
    np.testing.assert_array_equal(q, np.diff(offsets).astype(np.float64))


@pytest.mark.parametrize("workers", [0, 2])
def test_loss_feedback_by_shard_moves_draws_and_resumes(lake, workers):
    """The loss mode above the threshold: `ShardedLoss` with shard affinity; fed-back losses move the
    next epoch's draws toward high-loss rows; its plan equals a `ShardedImportance` over the frozen
    priorities; a mid-epoch state resumes the same batches and priorities."""
    def run(stop: int | None = None):
        dl = make(lake, importance_sampling="loss", num_workers=workers, **BLOCK)
        out = []
        for e in range(2):
            for j, b in enumerate(dl):
                dl.update_priorities(b["id"], torch.where(b["id"] % 10 == 0, 20.0, 0.1))
                out.append(b["id"].clone())
                if stop is not None and e == 1 and j == stop:
                    return out, dl.state_dict(), dl
        return out, None, dl

    full, _, dl = run()
    sampler = dl.dataset.sampler
    assert isinstance(sampler, ShardedLoss) and dl.spec.shard_affinity
    per_epoch = len(full) // 2
    first = torch.cat(full[:per_epoch])
    second = torch.cat(full[per_epoch:])
    assert float((first % 10 == 0).double().mean()) < 0.2 < float((second % 10 == 0).double().mean())
    snap = lake.snapshot
    frozen = sampler.frozen(1).astype(np.float64)
    plain = ShardedImportance.from_arrays(snap.shard_offsets, frozen, snap.read_all("alpha"), seed=3)
    m = delivered_draws(N, BS, 1, False)
    for a, b in zip(sampler.plan(1, m), plain.plan(1, m)):
        np.testing.assert_array_equal(a, b)
    head, state, _ = run(stop=3)
    resumed = make(lake, importance_sampling="loss", num_workers=workers, **BLOCK)
    resumed.load_state_dict(state)
    tail = [b["id"].clone() for b in resumed]
    assert [t.tolist() for t in head + tail] == [t.tolist() for t in full]
