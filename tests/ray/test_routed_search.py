"""The Ray engine's routed list search, run in-process (no cluster): owners, routing and the merge.

The distributed kNN routes every row once to each list-owner task holding its home list or a list it
probes; each task runs the local engine's list search (`m2m.index.knn.list_search`) over its lists
only, and each range merges its rows' candidates in one heap. These tests pin that the union of the
tasks finds exactly what the local search over all lists finds (float32: the same pairs, the same
scores), that no pair reaches a row twice, and that the owner plan is a pure, balanced, local one.
"""

from __future__ import annotations

import numpy as np
import pytest

from m2m.index.kmeans import partition_of, probe_lists, train_centroids
from m2m.index.knn import list_search
from m2m.index.runtime import compute_threads
from m2m.ray.geometry import _best_k, _knn_lists_task
from m2m.ray.owners import group_lists, owners_per_row

K = 8


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(60, d))
    x = centers[rng.integers(0, 60, n)] + 0.45 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _routed_parts(x: np.ndarray, probes: np.ndarray, owner: np.ndarray, ranges: list[tuple[int, int]]):
    """What the route tasks hand each owner: per range, its rows with a list the owner holds."""
    who = np.where(probes >= 0, owner[np.maximum(probes, 0)], -1)
    parts = []
    for p in range(int(owner.max()) + 1):
        per_range = []
        for lo, hi in ranges:
            rows = lo + np.flatnonzero((who[lo:hi] == p).any(axis=1))
            per_range.append({"pos": rows, "vec": x[rows], "probes": probes[rows].astype(np.int32), "label": None})
        parts.append(per_range)
    return parts


@pytest.fixture(scope="module")
def setup():
    x = _clustered(6_000, 24, 0)
    nlist = 40
    with compute_threads(1) as faiss:
        centroids = train_centroids(x, nlist, niter=5, seed=0, max_points_per_centroid=40)
        probes = probe_lists(faiss, x, centroids, 5, "float32", 0.08)
    return x, probes, nlist


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_routed_tasks_find_what_the_local_list_search_finds(setup, parts):
    x, probes, nlist = setup
    with compute_threads(1) as faiss:
        want_s, want_i = list_search(faiss, x, partition_of(probes, nlist), K, True, "float32")
    owner = group_lists(probes[::3], nlist, parts)
    ranges = [(0, 2_500), (2_500, 4_000), (4_000, 6_000)]
    starts = np.array([lo for lo, _ in ranges])
    task_out = [_knn_lists_task(K, nlist, np.flatnonzero(owner == p), starts, *per_range)
                for p, per_range in enumerate(_routed_parts(x, probes, owner, ranges))]
    for j, (lo, hi) in enumerate(ranges):
        got_i, got_s = _best_k(hi - lo, lo, K, tuple(t[j] if parts > 1 else t for t in task_out)
                               if parts > 1 else (task_out[0][j],))
        # no neighbour twice in a row: each pair reaches each row once, whichever task scores it
        for row in got_i:
            assert np.unique(row[row >= 0]).size == (row >= 0).sum()
        np.testing.assert_array_equal(np.sort(got_i, axis=1), np.sort(want_i[lo:hi], axis=1))
        np.testing.assert_allclose(np.sort(got_s, axis=1), np.sort(want_s[lo:hi], axis=1), rtol=0, atol=1e-6)


def test_bfloat16_routed_search_keeps_the_local_recall(setup):
    x, probes, nlist = setup
    with compute_threads(1) as faiss:
        _, full = list_search(faiss, x, partition_of(probes, nlist), K, True, "float32")
    owner = group_lists(probes, nlist, 4)
    ranges = [(0, 6_000)]
    parts = _routed_parts(x, probes, owner, ranges)
    visited = np.zeros(nlist, bool)
    found = []
    for p in range(4):
        rows = parts[p][0]["pos"]
        mine = np.flatnonzero(owner == p)
        visited[:] = False
        visited[mine] = True
        with compute_threads(1) as faiss:
            s, i = list_search(faiss, x[rows], partition_of(probes[rows], nlist, visited), K, True, "bfloat16",
                               lists=mine)
        found.append({"pos": rows, "nbr": np.where(i >= 0, rows[np.maximum(i, 0)], -1), "score": s})
    got, _ = _best_k(6_000, 0, K, tuple(found))
    agree = np.mean([np.intersect1d(a, b).size / K for a, b in zip(got, full)])
    assert agree > 0.995, agree  # bfloat16 pass-2 scores: a neighbour at a near tie may swap


def test_group_lists_is_a_balanced_local_plan(setup):
    x, _, nlist = setup
    with compute_threads(1) as faiss:  # every row probes its 4 nearest lists: copies to save
        centroids = train_centroids(x, nlist, niter=5, seed=0, max_points_per_centroid=40)
        probes = probe_lists(faiss, x, centroids, 4)
    sample = probes[::2]
    owner = group_lists(sample, nlist, 5)
    assert owner.shape == (nlist,) and set(owner.tolist()) == set(range(5))
    np.testing.assert_array_equal(owner, group_lists(sample.copy(), nlist, 5))  # pure
    # grouping lists probed together ships each row to fewer tasks than dealing them out by size
    sizes = np.bincount(sample[:, 0], minlength=nlist)
    dealt = np.empty(nlist, np.int64)
    dealt[np.argsort(-sizes, kind="stable")] = np.arange(nlist) % 5
    assert owners_per_row(probes, owner) < owners_per_row(probes, dealt) - 0.2
    # each task holds about its share of the scoring cost (members x (members + visitors))
    vis = sample[:, 1:]
    members = np.bincount(sample[:, 0], minlength=nlist).astype(float)
    cost = members * (members + np.bincount(vis[vis >= 0], minlength=nlist)) + 1
    load = np.bincount(owner, weights=cost, minlength=5)
    assert load.max() < 2.0 * load.mean(), load
    assert (group_lists(sample, nlist, 1) == 0).all()
    tiny = np.array([[0, 1], [1, 2], [2, -1]])
    assert sorted(group_lists(tiny, 3, 8).tolist()) == [0, 1, 2]  # no more tasks than lists


def test_partition_of_records_only_the_visitors_of_the_lists_asked():
    probes = np.array([[0, 1, -1], [1, 0, 2], [2, 1, -1], [1, -1, -1]])
    every = partition_of(probes, 3)
    some = partition_of(probes, 3, np.array([False, True, False]))
    np.testing.assert_array_equal(every.members(1), [1, 3])
    np.testing.assert_array_equal(some.members(1), [1, 3])  # members: every row, by home
    np.testing.assert_array_equal(np.sort(every.visitors(1)), [0, 2])
    np.testing.assert_array_equal(np.sort(some.visitors(1)), [0, 2])
    assert every.visitors(0).tolist() == [1] and some.visitors(0).size == 0
    assert every.visitors(2).tolist() == [1] and some.visitors(2).size == 0


def test_co_probe_counts_do_not_depend_on_the_chunking(setup, monkeypatch):
    from m2m.ray import owners

    _, probes, nlist = setup
    whole = owners._co_probes(probes, nlist)
    monkeypatch.setattr(owners, "PAIR_CHUNK_ROWS", 97)
    chunked = owners._co_probes(probes, nlist)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
    # a pair probed by one row, counted both ways
    indptr, dst, count = owners._co_probes(np.array([[0, 2, -1], [1, -1, -1]]), 3)
    assert indptr.tolist() == [0, 1, 1, 2] and dst.tolist() == [2, 0] and count.tolist() == [1.0, 1.0]
