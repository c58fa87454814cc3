"""IVF internals of m2m.index.knn: padded heap pushes, rescored calibration neighbours, bfloat16 search."""

from __future__ import annotations

import numpy as np
import pytest

from m2m.index.exact import exact_knn_of, rescored_knn_of
from m2m.index.knn import _push, knn
from tests.index.conftest import brute_knn, manifold, recall


def test_push_keeps_the_top_k_of_every_line_including_wide_lines() -> None:
    import faiss

    g = np.random.default_rng(0)
    n, k = 50, 5
    line = np.sort(np.concatenate([g.integers(0, 40, 300), np.full(60, 7)]))  # line 7 holds > 16
    ids = g.permutation(line.size).astype(np.int64)
    scores = g.random(line.size).astype(np.float32)
    rows = g.permutation(n)[:40].astype(np.int64)
    heap = faiss.ResultHeap(n, k, keep_max=True)
    _push(heap, line, 40, rows, ids, scores)
    heap.finalize()
    for ln in range(40):
        sel = line == ln
        best = np.sort(scores[sel])[::-1][:k]
        got = heap.D[rows[ln]]
        np.testing.assert_array_equal(got[:best.size], best)
        assert set(heap.I[rows[ln]][:best.size].tolist()) == set(ids[sel][np.argsort(-scores[sel])[:k]].tolist())


def test_rescored_knn_of_equals_exact() -> None:
    import faiss

    x = manifold(5000, 64, seed=11)
    q = x[::50]
    ds, di = exact_knn_of(faiss, x, q, 9)
    rs, ri = rescored_knn_of(faiss, x, q, 9)
    np.testing.assert_array_equal(ri, di)
    np.testing.assert_allclose(rs, ds, atol=1e-5)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_ivf_recall_and_scores_at_128_dims(precision: str) -> None:
    n, k = 12_000, 16
    x = manifold(n, 128, seed=12)
    scores, idx = knn(x, k, exact_max_rows=0, seed=1, precision=precision)
    _, truth = brute_knn(x, k)
    assert recall(idx, truth) >= 0.95
    exact = np.einsum("nd,nkd->nk", x, x[np.maximum(idx, 0)])
    tol = 1e-5 if precision == "float32" else 3e-3
    assert np.abs(exact - scores)[idx >= 0].max() <= tol
    srt = np.sort(idx, axis=1)
    assert ((np.diff(srt, axis=1) != 0) | (srt[:, 1:] < 0)).all()  # no neighbour twice


def test_ivf_without_exclude_self_lists_self_first() -> None:
    x = manifold(5000, 128, seed=14)
    scores, idx = knn(x, 6, exclude_self=False, exact_max_rows=0, seed=3, precision="bfloat16")
    assert (idx[:, 0] == np.arange(5000)).mean() > 0.999


def test_ivf_bfloat16_probing_every_list_misses_only_near_ties() -> None:
    # every pair is scored: what the score prefilter and the heaps keep must be the top k
    x = manifold(4000, 128, seed=15)
    scores, idx = knn(x, 10, exact_max_rows=0, nlist=8, nprobe=8, precision="bfloat16")
    ts, ti = brute_knn(x, 10)
    assert recall(idx, ti) >= 0.995
    missed = ~(idx[:, :, None] == ti[:, None, :]).any(axis=2)  # found but not in the true top k
    assert (ts[:, -1:] - scores)[missed].max(initial=0.0) <= 2e-3  # only rows within rounding of the k-th
