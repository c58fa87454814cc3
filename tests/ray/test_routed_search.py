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
from m2m.ray.owners import group_lists, owners_per_row, probe_owners

K = 8


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(60, d))
    x = centers[rng.integers(0, 60, n)] + 0.45 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _routed_parts(x: np.ndarray, probes: np.ndarray, owner: np.ndarray, ranges: list[tuple[int, int]]):
    """What the route tasks hand each owner: per range, its rows with a list the owner holds."""
    who = probe_owners(probes, owner)
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


def _reachable(probes: np.ndarray) -> np.ndarray:
    """``bool [N, N]``: the pairs of other rows the IVF rule can reach (same home list, or one of the
    two rows probes the other's home list)."""
    home = probes[:, 0]
    visits = np.zeros((len(probes), int(probes.max()) + 1), bool)
    for c in range(1, probes.shape[1]):
        ok = probes[:, c] >= 0
        visits[np.flatnonzero(ok), probes[ok, c]] = True
    reach = (home[:, None] == home[None, :]) | visits[:, home] | visits[:, home].T
    np.fill_diagonal(reach, False)
    return reach


def _reachable_top_k(x: np.ndarray, probes: np.ndarray, k: int) -> np.ndarray:
    """Brute force: each row's k best rows among those the IVF rule can reach."""
    s = np.where(_reachable(probes), x @ x.T, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("d, parts", [(24, 4), (384, 6)])
def test_bfloat16_routed_search_finds_what_the_local_one_finds(d, parts):
    # the bfloat16 prefilter of rows homed in other tasks' lists is cut at their k-th best score of
    # their first block: a cut that is not conservative loses true neighbours against brute force
    x = _clustered(3_000, d, 1)
    nlist = 40
    with compute_threads(1) as faiss:
        centroids = train_centroids(x, nlist, niter=5, seed=0, max_points_per_centroid=40)
        probes = probe_lists(faiss, x, centroids, 5)
        _, local = list_search(faiss, x, partition_of(probes, nlist), K, True, "bfloat16")
    exact = _reachable_top_k(x, probes, K)
    owner = group_lists(probes, nlist, parts)
    found = [_knn_lists_task(K, nlist, np.flatnonzero(owner == p), np.array([0]), per_range[0])
             for p, per_range in enumerate(_routed_parts(x, probes, owner, [(0, len(x))]))]
    got, _ = _best_k(len(x), 0, K, tuple(found))
    for row in got:
        assert np.unique(row[row >= 0]).size == (row >= 0).sum()

    def recall(nbr: np.ndarray) -> float:
        return float(np.mean([np.intersect1d(a, b).size / K for a, b in zip(nbr, exact)]))

    # bfloat16 pass-2 scores may swap a neighbour at a near tie: the same few the local search swaps
    assert recall(got) >= recall(local) - 5e-4 and recall(got) > 0.998, (recall(got), recall(local))


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
    monkeypatch.setattr(owners, "PAIR_CHUNK", 97 * probes.shape[1] ** 2)
    chunked = owners._co_probes(probes, nlist)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
    # a pair probed by one row, counted both ways
    indptr, dst, count = owners._co_probes(np.array([[0, 2, -1], [1, -1, -1]]), 3)
    assert indptr.tolist() == [0, 1, 1, 2] and dst.tolist() == [2, 0] and count.tolist() == [1.0, 1.0]


def test_block_roots_cut_rows_with_open_heaps_just_below_their_kth_best():
    # the invariant behind the exactness of rows homed in other tasks' lists (their heaps start empty)
    import torch

    from m2m.index.knn import _ListSearch

    rng = np.random.default_rng(3)
    block = rng.uniform(-1, 1, (40, 300)).astype(np.float32)
    t_v = np.full(40, 0.3, np.float32)
    t_v[:10] = np.finfo(np.float32).min  # the first 10 heaps are not full (sorted first, as visited_list does)
    me = type("Search", (), {"kh": 8, "torch": torch})()
    kth = np.sort(block[:10], axis=1)[:, -8]
    cut = _ListSearch._block_roots(me, t_v, torch.from_numpy(block))
    np.testing.assert_array_equal(cut[:10], np.nextafter(kth, np.float32(-np.inf)))  # `s > cut` keeps the k-th
    np.testing.assert_array_equal(cut[10:], t_v[10:])
    # bfloat16 blocks hold scores minus offsets o: the cut, rebuilt as cut - o, must not pass the k-th best
    r = torch.from_numpy(block).to(torch.bfloat16)
    o = rng.uniform(-0.5, 0.5, 40).astype(np.float32)
    kth_r = np.sort(r[:10].float().numpy(), axis=1)[:, -8]
    cut = _ListSearch._block_roots(me, t_v, r, o)
    slack = kth_r - (cut[:10] - o[:10])
    assert (slack >= 0).all() and (slack < 1e-4).all(), slack
    assert _ListSearch._block_roots(me, t_v, torch.from_numpy(block[:, :8])) is t_v  # no wider than k: no cut


@pytest.mark.parametrize("with_labels", [False, True])
def test_routed_duplicate_search_finds_the_reachable_groups(with_labels):
    from m2m.consolidation.groups import connected_components
    from m2m.ray.geometry import _duplicates_task

    rng = np.random.default_rng(1)
    base = _clustered(1_500, 16, 0)
    x = np.repeat(base, 2, 0) + 0.003 * rng.normal(size=(3_000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    n, nlist, thr = len(x), 30, 0.99
    labels = rng.integers(0, 2, n) if with_labels else None
    with compute_threads(1) as faiss:
        centroids = train_centroids(x, nlist, niter=5, seed=0, max_points_per_centroid=40)
        probes = probe_lists(faiss, x, centroids, 3)
    edge = _reachable(probes) & (x @ x.T >= thr)
    if labels is not None:
        edge &= labels[:, None] == labels[None, :]
    want = connected_components(n, *np.nonzero(edge))
    assert np.unique(want).size < n - 500  # there are groups to find
    for parts in (1, 3, 7):
        owner = group_lists(probes, nlist, parts)
        us, vs = [], []
        for p, per_range in enumerate(_routed_parts(x, probes, owner, [(0, 1_000), (1_000, n)])):
            if labels is not None:
                for part in per_range:
                    part["label"] = labels[part["pos"]].astype(np.int64)
            u, v = _duplicates_task(thr, nlist, np.flatnonzero(owner == p), *per_range)
            us.append(u)
            vs.append(v)
        got = connected_components(n, np.concatenate(us), np.concatenate(vs))
        # the same partition of the rows (group ids may differ)
        pairs = np.unique(np.stack([want, got], 1), axis=0)
        assert len(pairs) == np.unique(want).size == np.unique(got).size, parts


def test_finish_ranges_bound_a_tasks_vectors():
    from m2m.ray.geometry import FINISH_BYTES, _finish_ranges

    assert _finish_ranges(1_000_000, 16, 1536, 2) == 2  # 1M x 384 f32: two ranges of 500k (+ 500k outside)
    assert _finish_ranges(300_000, 16, 1536, 8) == 8  # at least one per worker
    for n, k, row, workers in ((10**9, 16, 3072, 64), (5 * 10**6, 16, 1536, 2), (10**7, 4, 4096, 2)):
        r = _finish_ranges(n, k, row, workers)
        own = n / r
        assert (own + min(n - own, k * own)) * row <= FINISH_BYTES  # own rows and their outside neighbours
        assert r >= workers
    assert _finish_ranges(3, 16, 1536, 4) == 3  # never more ranges than rows
