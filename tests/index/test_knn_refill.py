"""IVF rows left with fewer than k neighbours are searched exactly (a probing user, 2026-12-07: on 24,000
clustered rows with near-duplicates three rows were alone in their list, visited by no other row's
probes, and got no neighbour and NaN kappa, though thousands of rows lay at cosine 0.97)."""

from __future__ import annotations

import numpy as np

from m2m.index.knn import knn, refill_short_rows
from m2m.index.runtime import require_faiss
from tests.conftest import lone_list_rows


def test_refill_fills_exactly_the_short_rows():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((300, 8)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    want_s, want_i = knn(mu, 5, exact_max_rows=10_000)
    scores, idx = want_s.copy(), want_i.copy()
    idx[[3, 77], :] = -1
    idx[100, 2:] = -1
    scores[idx < 0] = -np.inf
    got_s, got_i, n = refill_short_rows(require_faiss(), mu, scores, idx, 5, True)
    assert n == 3
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-6)


def test_an_ivf_search_leaves_no_row_without_neighbours():
    x = lone_list_rows()
    stats: dict = {}
    _, idx = knn(x, 8, stats=stats, threads=1)
    assert stats["method"] == "ivf"
    assert not (idx < 0).any(), np.flatnonzero((idx < 0).any(axis=1))
