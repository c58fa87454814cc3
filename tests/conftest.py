"""Shared fixtures: small unit-vector datasets and lakes in temporary directories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def lake_path(tmp_path):
    return tmp_path / "lake"


def lone_list_rows(n: int = 24_000, d: int = 16, seed: int = 3) -> np.ndarray:
    """Clustered unit rows, 30% of them near-duplicates of their centre: an IVF search leaves some rows
    alone in lists no other row's probes visit (the data of the kNN refill tests, local and Ray)."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(60, d))
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    c = rng.integers(0, 60, n)
    x = cent[c] + 0.05 * rng.normal(size=(n, d))
    dup = rng.random(n) < 0.3
    x[dup] = cent[c[dup]] + 0.001 * rng.normal(size=(int(dup.sum()), d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, clusters: int = 8, spread: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors in ``clusters`` tight clusters, with the cluster index as label."""
    g = np.random.default_rng(seed)
    centers = g.standard_normal((clusters, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = g.integers(0, clusters, n)
    x = centers[labels] + spread * g.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)
