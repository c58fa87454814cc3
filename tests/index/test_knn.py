"""All-rows kNN: exact path equals brute force; IVF path reaches its recall; contracts of the output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from m2m.errors import ConfigError, InvalidEmbeddingError
from m2m.index.knn import knn
from tests.index.conftest import brute_knn, manifold, recall


def test_import_m2m_does_not_import_faiss() -> None:
    code = "import sys, m2m, m2m.index, m2m.sampling, m2m.consolidation; assert 'faiss' not in sys.modules, 'faiss imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_exact_path_equals_brute_force(exclude_self: bool) -> None:
    x = manifold(400, 24, seed=1)
    scores, idx = knn(x, 7, exclude_self=exclude_self)
    ts, ti = brute_knn(x, 7, exclude_self)
    assert idx.dtype == np.int64 and scores.dtype == np.float32 and idx.shape == (400, 7)
    assert recall(idx, ti) == 1.0
    np.testing.assert_allclose(scores, ts, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    if not exclude_self:
        assert (idx[:, 0] == np.arange(400)).all()


def test_exact_duplicates_are_neighbours_and_self_is_excluded_by_index() -> None:
    x = manifold(200, 16, seed=2)
    x[100:110] = x[0]  # ten copies of row 0
    _, idx = knn(x, 10)
    assert not (idx == np.arange(200)[:, None]).any()
    assert set(idx[0]) == set(range(100, 110))
    assert set(idx[100]) == {0, *range(101, 110)}


def test_float16_input_matches_float32_of_the_same_renormalised_values() -> None:
    x = manifold(300, 32, seed=3).astype(np.float16)
    x32 = x.astype(np.float32)
    s16, i16 = knn(x, 5)
    s32, i32 = knn(x32 / np.linalg.norm(x32, axis=1, keepdims=True), 5)
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_array_equal(s16, s32)


def test_missing_neighbours_are_minus_one_with_minus_inf() -> None:
    x = manifold(4, 8, seed=4)
    scores, idx = knn(x, 6)
    assert (idx[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert (idx[:, :3] >= 0).all()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_ivf_path_recall_and_contracts(precision: str) -> None:
    n, k = 8_000, 10
    x = manifold(n, 32, seed=5)
    done: list[int] = []
    scores, idx = knn(x, k, exact_max_rows=0, seed=3, progress=done.append, precision=precision)
    assert sum(done) == n
    _, truth = brute_knn(x, k)
    assert recall(idx, truth) >= 0.95
    assert not (idx == np.arange(n)[:, None]).any()
    valid = idx >= 0
    assert valid.mean() > 0.999
    # no row lists the same neighbour twice
    srt = np.sort(np.where(valid, idx, -np.arange(1, k + 1)[None, :]), axis=1)
    assert (np.diff(srt, axis=1) != 0).all()
    exact = np.einsum("nd,nkd->nk", x, x[np.maximum(idx, 0)])
    tol = 1e-5 if precision == "float32" else 4e-3
    assert np.abs(exact - scores)[valid].max() <= tol
    assert (np.diff(scores, axis=1) <= tol).all()


@pytest.mark.parametrize("dim,precision", [(16, "float32"), (128, "bfloat16")])
def test_ivf_path_is_deterministic_for_a_seed(dim: int, precision: str) -> None:
    x = manifold(6000, dim, seed=6)
    a = knn(x, 5, exact_max_rows=0, seed=11, precision=precision)
    b = knn(x, 5, exact_max_rows=0, seed=11, precision=precision)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_ivf_with_fixed_nprobe_covering_every_list_is_exact() -> None:
    x = manifold(3000, 16, seed=7)
    scores, idx = knn(x, 6, exact_max_rows=0, nlist=8, nprobe=8, precision="float32")
    ts, ti = brute_knn(x, 6)
    assert recall(idx, ti) == 1.0
    np.testing.assert_allclose(scores, ts, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        lambda x: x.astype(np.float64),
        lambda x: x[0],
        lambda x: x * 2,
        lambda x: np.where(np.arange(len(x))[:, None] == 0, np.nan, x).astype(np.float32),
        lambda x: x.tolist(),
    ],
)
def test_invalid_input_raises_value_error(bad) -> None:
    x = manifold(50, 8, seed=8)
    with pytest.raises(InvalidEmbeddingError):
        knn(bad(x), 3)


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"k": 2.5}, {"k": 3, "threads": 0}, {"k": 3, "precision": "fp8"},
                                    {"k": 3, "target_recall": 1.5}])
def test_invalid_arguments_raise_config_error(kwargs) -> None:
    with pytest.raises(ConfigError):
        knn(manifold(50, 8, seed=9), **kwargs)


def test_empty_input() -> None:
    scores, idx = knn(np.zeros((0, 8), np.float32), 3)
    assert scores.shape == (0, 3) and idx.shape == (0, 3)


def test_probe_budget_caps_the_lists_probed_on_unstructured_data():
    # random directions have no cluster structure: the calibrated rule wants (nearly) every list
    rng = np.random.default_rng(3)
    mu = rng.standard_normal((6000, 64)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    free: dict = {}
    knn(mu, 8, exact_max_rows=0, stats=free, nlist=64)
    assert free["nprobe"] > 8
    capped: dict = {}
    scores, idx = knn(mu, 8, exact_max_rows=0, stats=capped, nlist=64, probe_budget=4)
    assert capped["nprobe"] <= 4 and capped["scored_pairs"] < free["scored_pairs"]
    assert capped["calibrated_recall"] < free["calibrated_recall"]
    assert (idx >= 0).all() and np.all(np.diff(scores, axis=1) <= 0)    # still k valid, sorted neighbours
