"""Data for the index tests: unit vectors on a curved low-dimensional manifold (realistic neighbourhoods)."""

from __future__ import annotations

import numpy as np


def manifold(n: int, d: int = 32, seed: int = 0, intrinsic: int = 5, scale: float = 0.6, noise: float = 0.15) -> np.ndarray:
    """``n`` float32 unit rows: random Fourier features of a Gaussian mixture in ``intrinsic`` dims, plus noise.

    Neighbourhoods vary continuously (no clean clusters), so an IVF partition cuts through them
    as it does for real embeddings.
    """
    g = np.random.default_rng(seed)
    modes = g.standard_normal((16, intrinsic))
    width = g.uniform(0.3, 1.0, 16)
    w = g.standard_normal((intrinsic, d)) * scale
    b = g.uniform(0, 2 * np.pi, d)
    m = g.integers(0, 16, n)
    z = modes[m] + width[m, None] * g.standard_normal((n, intrinsic))
    x = np.cos(z @ w + b) + noise * g.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_knn(x: np.ndarray, k: int, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product in float64, blocked (self excluded by index)."""
    x64 = x.astype(np.float64)
    scores = np.empty((len(x), k))
    idx = np.empty((len(x), k), np.int64)
    for start in range(0, len(x), 1024):
        s = x64[start:start + 1024] @ x64.T
        if exclude_self:
            s[np.arange(s.shape[0]), np.arange(start, start + s.shape[0])] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(s.shape[1]), (len(s), 1))
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
        idx[start:start + len(s)] = np.take_along_axis(top, order, axis=1)
        scores[start:start + len(s)] = np.take_along_axis(s, idx[start:start + len(s)], axis=1)
    return scores, idx


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of true neighbours present in ``found`` (row by row)."""
    return float((found[:, :, None] == truth[:, None, :]).any(axis=1).mean())
