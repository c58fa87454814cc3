"""Self-organised criticality of a lake: how redundant it is, and whether consolidation is due.

Redundancy is the fraction of rows consolidation would remove, (N - #components) / N for the
near-duplicate graph of ``m2m.consolidation.groups``. Summing 1 - 1/|C| over the members of a
component C gives |C| - 1, so

    (N - #components) / N = mean over rows i of (1 - 1 / |component(i)|),

a mean over rows that a uniform random sample estimates without bias (standard error at most
0.5 / sqrt(sample)), given each sampled row's component size. That size is approximated by
1 + deg(i), the row itself plus its duplicates found by an exhaustive search of the sampled row
against every row (same label, cos >= similarity). The approximation is exact when every
component is a clique -- every pair within it is itself a duplicate, as for tight groups of
copies or near-copies whose diameter stays above the threshold -- and underestimates the size
(so the redundancy) when components are chains of pairwise-close rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from m2m._validate import check_int
from m2m.consolidation.groups import label_codes, similarity_threshold
from m2m.errors import ConfigError
from m2m.index.rows import CHUNK_ROWS, check_unit_rows, rows_f32
from m2m.index.runtime import compute_threads

__all__ = ["STATES", "criticality_state", "duplicate_degree", "estimate_redundancy"]

STATES = ("subcritical", "critical", "supercritical")


def duplicate_degree(
    mu: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray | None,
    similarity: float,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """``int64 [len(rows)]``: for each given row, the number of *other* rows with cos >= similarity and its label.

    Exhaustive: the given rows are compared with every row (float32 products, chunked).
    """
    import torch

    mu = np.asarray(check_unit_rows(mu))
    thr = similarity_threshold(similarity)
    n = mu.shape[0]
    codes = label_codes(labels, n)
    rows = np.asarray(rows, dtype=np.int64)
    q = torch.from_numpy(rows_f32(mu, rows))
    degree = np.zeros(rows.size, np.int64)
    with compute_threads(threads):
        for start in range(0, n, CHUNK_ROWS):
            block = rows_f32(mu, slice(start, start + CHUNK_ROWS))
            hits = (q @ torch.from_numpy(block).T >= thr).numpy()
            cols = np.arange(start, start + block.shape[0])
            hits &= rows[:, None] != cols[None, :]
            if codes is not None:
                hits &= codes[rows][:, None] == codes[cols][None, :]
            degree += hits.sum(axis=1)
            if progress is not None:
                progress(block.shape[0])
    return degree


def estimate_redundancy(
    mu: np.ndarray,
    labels: np.ndarray | None,
    similarity: float,
    sample: int = 2000,
    seed: int = 0,
    *,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> float:
    """Estimated fraction of rows consolidation at ``similarity`` would remove (see module doc).

    ``sample`` rows are drawn without replacement (all rows when ``sample >= N``; the result is
    then exact whenever components are cliques). Cost: ``sample * N`` cosines.
    """
    mu = np.asarray(check_unit_rows(mu))
    sample = check_int(sample, "sample")
    n = mu.shape[0]
    if n == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if sample >= n else np.sort(rng.choice(n, size=sample, replace=False))
    degree = duplicate_degree(mu, rows, labels, similarity, progress, threads)
    return float(np.mean(1.0 - 1.0 / (1.0 + degree)))


def criticality_state(redundancy: float, threshold: float, band: float = 0.1) -> str:
    """``"subcritical"``, ``"critical"`` or ``"supercritical"`` of a redundancy against a threshold.

    Critical means within ``band * threshold`` of the threshold (10% relative by default: for
    threshold 0.2, redundancy in [0.18, 0.22]), a band wider than the sampling error of the
    default 2,000-row estimate (at most 0.011); below it subcritical, above it supercritical
    (consolidation advised).
    """
    if not np.isfinite(redundancy) or not 0.0 <= redundancy <= 1.0:
        raise ConfigError(f"redundancy must be in [0, 1], got {redundancy!r}")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold must be in (0, 1), got {threshold!r}")
    if not 0.0 <= band < 1.0:
        raise ConfigError(f"band must be in [0, 1), got {band!r}")
    if abs(redundancy - threshold) <= band * threshold + 1e-12:  # inclusive band, robust to rounding
        return "critical"
    return "subcritical" if redundancy < threshold else "supercritical"
