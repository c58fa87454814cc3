"""Spherical k-means: recovers separated clusters, unit centroids, deterministic per seed."""

from __future__ import annotations

import numpy as np
import pytest

from m2m.errors import ConfigError
from m2m.index.kmeans import gap_probes, spherical_kmeans


def _blobs(n: int, d: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    centers = np.linalg.qr(g.standard_normal((d, c)))[0].T  # orthonormal: well separated
    label = g.integers(0, c, n)
    x = centers[label] + 0.05 * g.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), label


def test_recovers_separated_clusters_with_unit_centroids() -> None:
    x, label = _blobs(3000, 32, 6, seed=0)
    done: list[int] = []
    centroids, assign = spherical_kmeans(x, 6, niter=20, seed=1, progress=done.append)
    assert sum(done) == 3000
    assert centroids.shape == (6, 32) and assign.shape == (3000,) and assign.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    # every true cluster maps to exactly one k-means cluster (purity 1)
    pairs = set(zip(label.tolist(), assign.tolist()))
    assert len(pairs) == 6 and len({a for _, a in pairs}) == 6
    # assignment is the nearest centroid by inner product
    np.testing.assert_array_equal(assign, np.argmax(x @ centroids.T, axis=1))


def test_deterministic_for_a_seed_and_float16_input() -> None:
    x, _ = _blobs(2000, 16, 5, seed=2)
    a = spherical_kmeans(x, 5, niter=5, seed=3, max_points_per_centroid=100)
    b = spherical_kmeans(x, 5, niter=5, seed=3, max_points_per_centroid=100)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = spherical_kmeans(x.astype(np.float16), 5, niter=5, seed=3)
    assert c[0].dtype == np.float32


@pytest.mark.parametrize("n_clusters", [0, 101, 2.0])
def test_bad_cluster_count(n_clusters) -> None:
    x, _ = _blobs(100, 8, 2, seed=4)
    with pytest.raises(ConfigError):
        spherical_kmeans(x, n_clusters)


@pytest.mark.parametrize("max_gap", [0.05, 0.3, 1.9])
def test_gap_probes_equal_thresholded_top_centroids(max_gap: float) -> None:
    import faiss

    from m2m.index.kmeans import gap_probes, top_centroids

    x, _ = _blobs(3000, 64, 40, seed=5)
    x = (x + 0.3 * np.random.default_rng(6).standard_normal(x.shape)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids, _ = spherical_kmeans(x, 40, niter=5, seed=7)
    got = gap_probes(x, centroids, 8, "float32", max_gap)
    ids, scores = top_centroids(faiss, x, centroids, 8, "float32", with_scores=True)
    want = np.where(scores[:, :1] - scores <= max_gap, ids, -1)
    np.testing.assert_array_equal(got[:, 0], want[:, 0])
    for g, w in zip(got, want):
        assert set(g[g >= 0].tolist()) == set(w[w >= 0].tolist())


def test_gap_probes_with_penalty_judge_other_lists_by_penalised_score() -> None:
    from m2m.index.kmeans import gap_probes

    g = np.random.default_rng(8)
    x, _ = _blobs(2000, 64, 30, seed=9)
    centroids, _ = spherical_kmeans(x, 30, niter=5, seed=10)
    penalty = g.uniform(-0.05, 0.05, 30).astype(np.float32)
    got = gap_probes(x, centroids, 30, "float32", 0.4, penalty)
    s = x @ centroids.T
    home = s.argmax(axis=1)
    np.testing.assert_array_equal(got[:, 0], home)
    ok = (s - penalty) >= (s.max(axis=1) - np.float32(0.4))[:, None]
    ok[np.arange(len(x)), home] = False
    for row, want in zip(got, ok):
        assert set(row[1:][row[1:] >= 0].tolist()) == set(np.flatnonzero(want).tolist())


@pytest.mark.parametrize("with_penalty", [False, True])
def test_gap_probes_with_an_infinite_gap_takes_the_nearest_lists(with_penalty):
    # max_gap = inf (a probe budget below what the recall needs) takes a top-k path: same result
    rng = np.random.default_rng(1)
    mu = rng.standard_normal((3000, 32)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    c = rng.standard_normal((50, 32)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    penalty = (rng.random(50) * 0.05).astype(np.float32) if with_penalty else None
    fast = gap_probes(mu, c, 8, "float32", float("inf"), penalty)
    general = gap_probes(mu, c, 8, "float32", 1e30, penalty)
    assert np.array_equal(fast, general)
