"""SearchIndex: exact search equals brute force, ids are the lake's ids, IVF recall, query validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m.errors import ConfigError, DimensionMismatchError, InvalidEmbeddingError
from m2m.index.search import SearchIndex
from tests.index.conftest import manifold, recall


def _truth(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn.astype(np.float64) @ x.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


def test_exact_search_equals_brute_force_and_returns_ids() -> None:
    x = manifold(2000, 24, seed=0)
    ids = np.arange(2000, dtype=np.int64) * 7 + 1000
    index = SearchIndex(x, ids)
    assert index.exact and len(index) == 2000
    q = manifold(50, 24, seed=1) * 3.0  # not unit: normalised by search
    scores, found = index.search(q, k=8)
    ts, ti = _truth(x, q, 8)
    assert found.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(found, ids[ti])
    np.testing.assert_allclose(scores, ts, atol=1e-5)


def test_accepts_torch_tensors_lists_and_single_vectors() -> None:
    x = manifold(300, 16, seed=2)
    index = SearchIndex(x)
    a = index.search(torch.from_numpy(x[:3]), 4)
    b = index.search(x[:3].tolist(), 4)
    c = index.search(x[0], 4)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[1][:1], c[1])
    assert (a[1][:, 0] == np.arange(3)).all()


def test_more_results_than_rows_are_padded() -> None:
    x = manifold(5, 8, seed=3)
    scores, found = SearchIndex(x).search(x[:2], 8)
    assert (found[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


def test_ivf_index_reaches_recall_on_new_queries() -> None:
    x = manifold(20_000, 32, seed=4)
    index = SearchIndex(x, exact_max_rows=1000, seed=5)
    assert not index.exact and index.nprobe >= 1
    q = manifold(20_400, 32, seed=4)[20_000:]  # fresh draws from the same distribution
    _, found = index.search(q, 10)
    _, ti = _truth(x, q, 10)
    assert recall(found, ti) >= 0.95


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.full((2, 16), np.nan, np.float32), InvalidEmbeddingError),
        (np.zeros((1, 16), np.float32), InvalidEmbeddingError),
        (np.ones((2, 15), np.float32), DimensionMismatchError),
        (np.ones((2, 2, 16), np.float32), InvalidEmbeddingError),
        ("abc", InvalidEmbeddingError),
    ],
)
def test_bad_queries_raise_value_errors(bad, error) -> None:
    index = SearchIndex(manifold(100, 16, seed=6))
    with pytest.raises(error):
        index.search(bad, 3)
    assert issubclass(error, ValueError)


def test_bad_ids_and_k() -> None:
    x = manifold(100, 16, seed=7)
    with pytest.raises(ConfigError):
        SearchIndex(x, np.arange(99))
    with pytest.raises(ConfigError):
        SearchIndex(x).search(x[:1], 0)
