"""Planted near-duplicate data for the SOC tests, and an O(n^2) reference grouping."""

from __future__ import annotations

import numpy as np


def planted(
    n_base: int,
    d: int,
    dup_rows: int,
    seed: int = 0,
    noise: float = 0.1,
    max_group: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows: ``n_base`` random directions plus ``dup_rows`` noisy copies of some of them.

    Copies are ``base + noise * g / sqrt(d)`` (g standard normal), renormalised: cosine to
    their source about ``1 / sqrt(1 + noise**2)`` (0.995 for noise 0.1). Returns the rows,
    shuffled, and the planted group of each row (the index of its base row).
    """
    g = np.random.default_rng(seed)
    base = g.standard_normal((n_base, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    sources = g.choice(n_base, size=min(n_base, max(1, dup_rows // max(1, max_group - 1))), replace=False)
    src = g.choice(sources, size=dup_rows)
    copies = base[src] + noise * g.standard_normal((dup_rows, d)) / np.sqrt(d)
    x = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    truth = np.concatenate([np.arange(n_base), src])
    perm = g.permutation(len(x))
    return x[perm].astype(np.float32), truth[perm]


def reference_groups(x: np.ndarray, labels: np.ndarray | None, similarity: float) -> np.ndarray:
    """Components of {cos >= similarity, same label} by dense float64 similarity + scipy."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    # cosines with the rows' float64 norms divided out, as the lake decides pairs at the threshold: the raw
    # dot of float32 unit rows is off by their norms' rounding (~3e-8), which put a pair at cosine 0.99999895
    # above a threshold of 1 - 1e-6 (a falsifying example, 2026-12-08)
    x64 = x.astype(np.float64)
    x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
    s = x64 @ x64.T
    adj = s >= min(similarity, 1 - 1e-6)
    if labels is not None:
        adj &= labels[:, None] == labels[None, :]
    u, v = np.nonzero(adj)
    _, comp = connected_components(coo_matrix((np.ones(u.size), (u, v)), shape=(len(x), len(x))), directed=False)
    return canonical(comp)


def canonical(group: np.ndarray) -> np.ndarray:
    """Group labels renamed to the first row of each group (comparable across numberings)."""
    _, first, inverse = np.unique(group, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]
