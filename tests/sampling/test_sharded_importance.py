"""Issue 21: importance plans drawn shard by shard (a rank computes only its own shards' draws)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m.errors import InvalidEmbeddingError
from m2m.sampling.importance import probabilities
from m2m.sampling.sharded import ShardedImportance
from m2m.stream import affinity, shuffle
from m2m.stream.loader import make_loader
from m2m.stream.order import Layout, delivered_draws
from m2m.stream.source import ArraySource

OFFSETS = np.array([0, 100, 100, 350, 600, 1000], dtype=np.int64)   # an empty shard too
N = int(OFFSETS[-1])


def sampler(seed: int = 3) -> tuple[ShardedImportance, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    scores = rng.gamma(0.5, 1.0, N)
    scores[:50] = 0.0                                               # the floor keeps them drawable
    alpha = rng.uniform(0.5, 2.0, N)
    return ShardedImportance.from_arrays(OFFSETS, scores, alpha, seed=seed), scores, alpha


def test_counts_sum_to_the_draws_and_are_deterministic():
    s, _, _ = sampler()
    for m in (0, 1, 999, 1000, 4321):
        c = s.shard_counts(2, m)
        assert c.sum() == m and c[1] == 0 and np.array_equal(c, s.shard_counts(2, m))
    assert not np.array_equal(s.shard_counts(2, 1000), s.shard_counts(3, 1000))


def test_expected_counts_and_weighted_means_match_the_one_stage_plan():
    s, scores, alpha = sampler()
    p = probabilities(scores, 0.1)
    m, epochs = 700, 300
    counts = np.zeros(N)
    estimates = []
    f = np.sin(np.arange(N))
    for e in range(epochs):
        rows, w = s.plan(e, num_draws=m)
        assert len(rows) == m and rows.min() >= 0 and rows.max() < N
        np.testing.assert_allclose(w, alpha[rows] / (m * p[rows]), rtol=1e-6)
        counts += np.bincount(rows, minlength=N)
        estimates.append(float(np.sum(w * f[rows])))
    # a row's count per epoch is within 1 of its expectation M p_i (floor/ceil at each of two stages)
    assert np.all(np.abs(counts / epochs - m * p) <= 0.3 + 5 * np.sqrt(m * p / epochs))
    target = float(np.sum(alpha * f))
    assert abs(np.mean(estimates) - target) < 4 * np.std(estimates) / np.sqrt(epochs) + 1e-9


def test_bad_scores_and_alpha_name_the_row():
    offsets = np.array([0, 3, 6])
    bad = ShardedImportance.from_arrays(offsets, np.array([1, 1, 1, 1, -1.0, 1]), np.ones(6))
    with pytest.raises(InvalidEmbeddingError, match="row 4 is -1"):
        bad.masses()
    zero = ShardedImportance.from_arrays(offsets, np.ones(6), np.array([1, 1, 1, 0.0, 0.0, 0.0]))
    with pytest.raises(InvalidEmbeddingError, match=r"alpha must be > 0; row \d is 0"):
        zero.plan(0)


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_the_sharded_plan_exactly(world, drop_last):
    s, _, _ = sampler()
    lay = Layout(shuffle.BLOCK, 16, 4)
    m = delivered_draws(N, 32, world, drop_last)
    parts = [affinity.rank_epoch_sharded(lay, OFFSETS, 32, drop_last, 7, 1, r, world, s, m) for r in range(world)]
    assert len({p.num_batches for p in parts}) == 1
    rows = np.concatenate([p.rows for p in parts])
    weights = np.concatenate([p.weights for p in parts])
    assert len(rows) == m                                        # the delivered draws, none dropped or padded
    whole_rows, whole_w = s.plan(1, num_draws=m)                 # the same multiset of (row, weight)
    key = np.lexsort((weights, rows))
    wkey = np.lexsort((whole_w, whole_rows))
    assert np.array_equal(rows[key], whole_rows[wkey]) and np.array_equal(weights[key], whole_w[wkey])
    for p in parts:                                              # a rank holds few shards
        assert len(affinity.shards_of(p.rows, OFFSETS)) <= 4


def source(n: int = N) -> ArraySource:
    rng = np.random.default_rng(1)
    mu = rng.standard_normal((n, 8)).astype(np.float32)
    return ArraySource({"mu": mu, "id": np.arange(n, dtype=np.int64)}, shard_rows=250)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_with_shard_affinity_streams_the_sharded_plan_and_resumes(workers):
    src = source()
    offsets = np.asarray(src.shard_offsets)
    rng = np.random.default_rng(2)
    s = ShardedImportance.from_arrays(offsets, rng.gamma(1.0, 1.0, N), np.ones(N), seed=5)
    kw = dict(batch_size=50, columns=("id", "weight"), shuffle_mode="block", shard_affinity=True,
              block_rows=25, warm_bytes=1 << 16)

    def ids(dl):
        return [(b["id"].tolist(), b["weight"].tolist()) for b in dl]

    per_rank = [ids(make_loader(src, sampler=s, rank=r, world_size=3, **kw)) for r in range(3)]
    got = np.concatenate([np.array(b[0]) for p in per_rank for b in p])
    want, _ = s.plan(0, num_draws=delivered_draws(N, 50, 3, False))
    assert np.array_equal(np.sort(got), np.sort(want))
    dl = make_loader(src, sampler=s, rank=1, world_size=3, num_workers=workers, **kw)
    assert ids(dl) == per_rank[1]
    it = iter(make_loader(src, sampler=s, rank=1, world_size=3, **kw))
    saved = make_loader(src, sampler=s, rank=1, world_size=3, **kw)
    it = iter(saved)
    [next(it) for _ in range(2)]
    resumed = make_loader(src, sampler=s, rank=1, world_size=3, num_workers=workers, **kw)
    resumed.load_state_dict(saved.state_dict())
    assert ids(resumed) == per_rank[1][2:]
    assert torch.is_tensor(next(iter(dl))["weight"])
