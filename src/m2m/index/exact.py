"""Exact (brute-force) nearest neighbours by inner product, and the result clean-up every search shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from m2m.index.rows import CHUNK_ROWS, rows_f32, writable_tensor

Progress = Callable[[int], None] | None

def drop_self(scores: np.ndarray, idx: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own index from its k+1 results (or the last result if self is absent)."""
    is_self = idx == rows[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(idx, order, axis=1)


def finish_results(scores: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mark missing neighbours as idx -1 and score -inf."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    missing = idx < 0
    if missing.any():
        scores[missing] = -np.inf
        idx[missing] = -1
    return scores, idx


def exact_knn_of(faiss: Any, mu: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (descending) of float32 ``queries`` over all rows of ``mu``, database in chunks."""
    n = mu.shape[0]
    heap = faiss.ResultHeap(queries.shape[0], k, keep_max=True)
    for start in range(0, n, CHUNK_ROWS):
        block = rows_f32(mu, slice(start, start + CHUNK_ROWS))
        d, i = faiss.knn(queries, block, min(k, block.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, np.where(i >= 0, i + start, -1))
    heap.finalize()
    return heap.D, heap.I


def rescored_knn_of(
    faiss: Any, mu: np.ndarray, queries: np.ndarray, k: int, extra: int = 48
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (descending) of float32 ``queries`` over all rows of ``mu``: bfloat16 products select
    ``k + extra`` candidates per query, exact float32 products of those rank them.

    Equals ``exact_knn_of`` unless a true top-k row ranks more than ``extra`` places lower in
    bfloat16 (score errors up to about 2e-3 on unit vectors; the default ``extra`` and the speed-up
    over ``exact_knn_of`` where bfloat16 is native: docs/tuning.md).
    """
    import torch

    n, d = mu.shape
    nq = queries.shape[0]
    kc = min(n, k + extra)
    heap = faiss.ResultHeap(nq, kc, keep_max=True)
    qb = torch.from_numpy(queries).to(torch.bfloat16)
    step = max(1024, (1 << 23) // max(1, nq))  # score blocks of about 32 MB
    buf = torch.empty(nq * step, dtype=torch.float32)
    every = np.arange(nq, dtype=np.int64)
    for start in range(0, n, step):
        block = writable_tensor(rows_f32(mu, slice(start, start + step))).to(torch.bfloat16)
        s_t = buf[:nq * block.shape[0]].view(nq, block.shape[0])
        s_t.copy_(qb @ block.T)
        heap.add_result_subset(every, s_t.numpy(), np.arange(start, start + block.shape[0], dtype=np.int64))
    heap.finalize()
    cand = heap.I
    rows = rows_f32(mu, np.maximum(cand, 0).ravel()).reshape(nq, kc, d)
    scores = np.einsum("qd,qcd->qc", queries, rows).astype(np.float32)
    scores[cand < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :min(k, kc)]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(cand, order, axis=1)


def knn_exact(
    faiss: Any, mu: np.ndarray, k: int, exclude_self: bool, progress: Progress
) -> tuple[np.ndarray, np.ndarray]:
    n = mu.shape[0]
    kk = k + 1 if exclude_self else k
    index = faiss.IndexFlatIP(mu.shape[1])
    for start in range(0, n, CHUNK_ROWS):
        index.add(rows_f32(mu, slice(start, start + CHUNK_ROWS)))
    scores = np.empty((n, k), np.float32)
    idx = np.empty((n, k), np.int64)
    step = 4096
    for start in range(0, n, step):
        q = rows_f32(mu, slice(start, start + step))
        d, i = index.search(q, kk)
        if exclude_self:
            d, i = drop_self(d, i, np.arange(start, start + q.shape[0]), k)
        scores[start:start + q.shape[0]], idx[start:start + q.shape[0]] = d, i
        if progress is not None:
            progress(q.shape[0])
    return finish_results(scores, idx)

