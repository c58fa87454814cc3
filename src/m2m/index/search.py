"""Cosine search of arbitrary query vectors over a fixed set of unit rows (FAISS flat or IVF-Flat)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from m2m._validate import as_vectors, check_int, check_rows, normalise_rows
from m2m.errors import ConfigError
from m2m.index.exact import drop_self, exact_knn_of
from m2m.index.rows import CHUNK_ROWS, check_unit_rows, rows_f32
from m2m.index.runtime import compute_threads

__all__ = ["SearchIndex"]

log = logging.getLogger(__name__)


def _as_queries(queries: Any, dim: int) -> np.ndarray:
    """Queries as C-contiguous float32 ``[q, dim]`` unit rows; ValueError naming the first bad row."""
    q = as_vectors(queries, dim, name="queries", allow_empty=True)
    check_rows(q, name="queries")
    return normalise_rows(q)


class SearchIndex:
    """k nearest rows (by cosine) of query vectors, reported by the rows' ids.

    Up to ``exact_max_rows`` rows the index is exact (FAISS ``IndexFlatIP``); above, FAISS
    ``IndexIVFFlat`` (inner product) with about 2*sqrt(N) spherical k-means lists trained on a
    sample, and ``nprobe`` calibrated at build time so that recall@``calibration_k`` measured
    on a sample of stored rows (each searching for its neighbours other than itself) reaches
    ``target_recall`` + 0.01. The index holds a float32 copy of the rows.

    Args:
        mu: ``[N, d]`` float32/float16 unit rows.
        ids: ``int64 [N]`` id of each row (default ``0..N-1``); search returns these.
        exact_max_rows, target_recall, calibration_k: see above.
        nlist, nprobe: override the IVF list count or the calibrated probe count.
        seed: seed of the k-means and calibration samples.
        threads: FAISS threads for building and searching (None: ``DEFAULT_THREADS``).
        progress: called with the number of rows added since the last call.
    """

    def __init__(
        self,
        mu: np.ndarray,
        ids: np.ndarray | None = None,
        *,
        exact_max_rows: int = 200_000,
        target_recall: float = 0.95,
        calibration_k: int = 10,
        nlist: int | None = None,
        nprobe: int | None = None,
        seed: int = 0,
        threads: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        from m2m.index.kmeans import default_nlist, train_centroids

        mu = np.asarray(check_unit_rows(mu))
        n, d = mu.shape
        if ids is None:
            ids = np.arange(n, dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"ids must be an integer array of shape ({n},), got {ids.dtype} {ids.shape}")
        if not 0.0 < target_recall <= 1.0:
            raise ConfigError(f"target_recall must be in (0, 1], got {target_recall!r}")
        exact_max_rows = check_int(exact_max_rows, "exact_max_rows", 0)
        calibration_k = check_int(calibration_k, "calibration_k")
        self._ids = ids.astype(np.int64, copy=True)
        self._threads = threads
        self.dim = d
        self.ntotal = n
        self.exact = n <= exact_max_rows or n < 1024
        with compute_threads(threads) as faiss:
            if self.exact:
                self._index = faiss.IndexFlatIP(d)
                self.nprobe = 0
            else:
                nl = min(n, default_nlist(n) if nlist is None else check_int(nlist, "nlist"))
                centroids = train_centroids(mu, nl, niter=10, seed=seed, max_points_per_centroid=32)
                quantizer = faiss.IndexFlatIP(d)
                quantizer.add(centroids)
                self._index = faiss.IndexIVFFlat(quantizer, d, nl, faiss.METRIC_INNER_PRODUCT)
                self._index.is_trained = True
                self._quantizer = quantizer  # the IVF index does not own it: keep it alive
            for start in range(0, n, CHUNK_ROWS):
                block = rows_f32(mu, slice(start, start + CHUNK_ROWS))
                self._index.add(block)
                if progress is not None:
                    progress(block.shape[0])
            if not self.exact:
                if nprobe is None:
                    self.nprobe, recall = self._calibrate(faiss, mu, calibration_k, target_recall, seed)
                    log.info("SearchIndex: %d rows, nlist=%d, nprobe=%d (calibrated recall@%d %.3f)",
                             n, nl, self.nprobe, calibration_k, recall)
                else:
                    self.nprobe = min(check_int(nprobe, "nprobe"), nl)
                self._index.nprobe = self.nprobe

    def _recall(self, queries: np.ndarray, rows: np.ndarray, truth: np.ndarray, nprobe: int, k: int) -> float:
        self._index.nprobe = nprobe
        _, found = self._index.search(queries, k + 1)
        hits = 0
        for r in range(k):  # k is small: vectorised over queries, looped over ranks
            col = truth[:, r:r + 1]
            hits += int(((found == col) & (col != rows[:, None])).any(axis=1).sum())
        return hits / truth.size

    def _calibrate(self, faiss: Any, mu: np.ndarray, k: int, target: float, seed: int) -> tuple[int, float]:
        n = mu.shape[0]
        rng = np.random.default_rng(seed + 1)
        rows = np.sort(rng.choice(n, size=min(n, 256), replace=False))
        queries = rows_f32(mu, rows)
        scores, truth = exact_knn_of(faiss, mu, queries, k + 1)
        _, truth = drop_self(scores, truth, rows, k)
        goal = min(1.0, target + 0.01)
        nlist = self._index.nlist
        lo, hi = 0, 1
        recall = self._recall(queries, rows, truth, hi, k)
        while recall < goal and hi < nlist:  # doubling, then bisection on (lo, hi]
            lo, hi = hi, min(nlist, hi * 2)
            recall = self._recall(queries, rows, truth, hi, k)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            r = self._recall(queries, rows, truth, mid, k)
            if r >= goal:
                hi, recall = mid, r
            else:
                lo = mid
        return hi, recall

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` stored rows most similar to each query.

        Args:
            queries: ``[q, d]`` or ``[d]`` numpy array, torch tensor or nested list; rows are
                normalised (NaN/Inf, zero rows and a wrong dimension raise ValueError).
            k: results per query.

        Returns:
            ``(scores float32 [q, k], ids int64 [q, k])``: cosines sorted descending and the
            rows' ids; when fewer than k rows are found the rest are id -1, score -inf.
        """
        k = check_int(k, "k")
        q = _as_queries(queries, self.dim)
        scores = np.empty((q.shape[0], k), np.float32)
        pos = np.empty((q.shape[0], k), np.int64)
        with compute_threads(self._threads):
            for start in range(0, q.shape[0], 4096):
                s, p = self._index.search(q[start:start + 4096], k)
                scores[start:start + s.shape[0]], pos[start:start + s.shape[0]] = s, p
        missing = pos < 0
        ids = self._ids[np.where(missing, 0, pos)] if self.ntotal else np.zeros_like(pos)
        ids[missing] = -1
        scores[missing] = -np.inf
        return scores, ids

    def __len__(self) -> int:
        return self.ntotal
