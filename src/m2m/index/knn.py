"""All-rows k-nearest-neighbour graph of unit vectors by inner product (cosine).

Up to ``exact_max_rows`` rows the graph is exact (FAISS ``IndexFlatIP``). Above it, an
inverted-file (IVF) partition search: spherical k-means centroids (FAISS) trained on a sample,
every row stored in the list of its nearest centroid ("home" list), every row probing the lists
among its ``nprobe`` nearest centroids whose score is within ``max_gap`` of its home centroid's
(adaptive probing: rows deep inside their list probe few others, rows near borders more), exact
inner products inside the probed lists. Because the queries are the stored rows themselves, the
search runs list by list (all rows probing a list are scored against it in one matrix product,
FAISS result heaps keep the top k) and each score is used in both directions: the pair (i, j) is
found when i probes j's list *or* j probes i's list, which halves the probes a recall needs.

The probe rule is calibrated on every call: the exact neighbours of a random sample of rows are
computed by brute force, and since a neighbour is found exactly when one of the two rows probes
the other's list, the recall of every rule follows from centroid scores -- the smallest
``max_gap`` reaching ``target_recall`` (+0.01 margin) is used.

Scores inside the probed lists are computed in float32, or in bfloat16 where the CPU multiplies
it faster (``precision="auto"``): each query's bfloat16 product is taken relative to an offset
(its current k-th best score, from its exact home-list pass), so that the rounding of the
bfloat16 *result* is about 1e-4 near the decision boundary instead of 4e-3. What remains is the
rounding of the bfloat16 inputs, about 2**-9 * sqrt(3 / d) (1e-4 at d = 384): returned IVF
scores carry that error (exact path and float32: exact to float32 rounding).

This module also holds the small helpers shared by ``m2m.index`` (lazy FAISS import, thread
control, input checks). FAISS is imported inside functions only: ``import m2m`` never loads it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from m2m._validate import check_int
from m2m.errors import ConfigError, InvalidEmbeddingError

__all__ = ["DEFAULT_THREADS", "compute_threads", "knn", "require_faiss"]

log = logging.getLogger(__name__)

Progress = Callable[[int], None] | None

#: FAISS/torch threads used when a caller passes ``threads=None``. On this shared 2-core
#: machine one thread was as fast as two or faster under load (benchmarks/bench_knn.py).
DEFAULT_THREADS = 1

#: Rows converted to float32 at once when the input is float16 (bounds temporary memory).
CHUNK_ROWS = 65_536

#: Rows of the sample whose exact neighbours calibrate the probe rule.
CALIBRATION_ROWS = 512

#: Query rows scored against one list at a time (bounds the [rows, list] score block).
QUERY_CHUNK = 2048

_PRECISIONS = ("auto", "float32", "bfloat16")


def require_faiss() -> Any:
    """Import and return the ``faiss`` module, or raise ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
        raise ImportError(
            "m2m.index needs FAISS; install it with `pip install faiss-cpu` (or faiss-gpu)"
        ) from exc
    return faiss


@contextlib.contextmanager
def compute_threads(threads: int | None) -> Iterator[Any]:
    """Run a block with FAISS (OpenMP) and torch limited to ``threads`` threads; yields faiss.

    Also lowers FAISS' BLAS threshold so small query batches use BLAS. Every setting is
    restored on exit.
    """
    import torch

    faiss = require_faiss()
    n = check_int(DEFAULT_THREADS if threads is None else threads, "threads")
    old_faiss = faiss.omp_get_max_threads()
    old_blas = faiss.cvar.distance_compute_blas_threshold
    old_torch = torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    faiss.cvar.distance_compute_blas_threshold = 20
    torch.set_num_threads(n)
    try:
        yield faiss
    finally:
        faiss.omp_set_num_threads(old_faiss)
        faiss.cvar.distance_compute_blas_threshold = old_blas
        torch.set_num_threads(old_torch)


def check_unit_rows(mu: Any, name: str = "mu", sample: int = 1024) -> np.ndarray:
    """Check that ``mu`` is a 2-D float16/float32 array of unit rows; return it (never copied).

    Shape and dtype are checked fully; finiteness and unit norm on an evenly spaced sample of
    ``sample`` rows (a full pass would cost as much as a search), naming the first bad row.
    """
    if not isinstance(mu, np.ndarray):
        raise InvalidEmbeddingError(f"{name} must be a numpy array, got {type(mu).__name__}")
    if mu.ndim != 2 or mu.shape[1] < 1:
        raise InvalidEmbeddingError(f"{name} must have shape [n, d], got {mu.shape}")
    if mu.dtype not in (np.float32, np.float16):
        raise InvalidEmbeddingError(f"{name} must be float32 or float16, got {mu.dtype}")
    n = mu.shape[0]
    if n:
        rows = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
        block = np.asarray(mu[rows], dtype=np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.linalg.norm(block, axis=1)
        bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-2)
        if bad.any():
            first = int(np.argmax(bad))
            raise InvalidEmbeddingError(
                f"{name} must hold finite unit rows; row {int(rows[first])} has norm {float(norms[first]):.6g}"
            )
    return mu


def rows_f32(mu: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """Rows of ``mu`` as a C-contiguous float32 array.

    float16 rows are converted and renormalised (float16 rounding leaves norms 1 +- 1e-3, which
    would put identical rows at cosine 0.999); float32 rows are returned as stored.
    """
    block = np.ascontiguousarray(mu[rows], dtype=np.float32)
    if mu.dtype == np.float16 and block.size:
        block /= np.linalg.norm(block, axis=-1, keepdims=True)
    return block


@functools.lru_cache(maxsize=1)
def _bf16_faster() -> bool:
    """Whether this CPU multiplies bfloat16 natively (so results never depend on a timing race).

    From the CPU flags where Linux reports them (x86 ``avx512_bf16`` / ``amx_bf16``); otherwise
    from a small timing probe (bfloat16 at least 1.4x faster than float32).
    """
    import torch

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            info = f.read()
    except OSError:
        info = ""
    if "flags" in info:
        flags = set(info.split())
        return bool({"avx512_bf16", "amx_bf16"} & flags)

    a = torch.randn(256, 384, generator=torch.Generator().manual_seed(0))
    b = torch.randn(512, 384, generator=torch.Generator().manual_seed(1))
    timings = []
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y.T
        t0 = time.perf_counter()
        for _ in range(5):
            x @ y.T
        timings.append(time.perf_counter() - t0)
    return timings[1] < 0.7 * timings[0]


def resolve_precision(precision: str, dim: int = 384) -> str:
    """``"float32"`` or ``"bfloat16"``.

    ``"auto"`` picks bfloat16 when this CPU multiplies it faster and ``dim >= 128`` (the rounding
    noise of bfloat16 inputs on a unit-vector product is about 2**-9 * sqrt(3 / dim): 1e-4 at
    384 dims, but 6e-4 at 32, where float32 is cheap anyway).
    """
    if precision not in _PRECISIONS:
        raise ConfigError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if dim >= 128 and _bf16_faster() else "float32"
    return precision


def _exclude_self(scores: np.ndarray, idx: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own index from its k+1 results (or the last result if self is absent)."""
    is_self = idx == rows[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _finish(scores: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _knn_exact(
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
            d, i = _exclude_self(d, i, np.arange(start, start + q.shape[0]), k)
        scores[start:start + q.shape[0]], idx[start:start + q.shape[0]] = d, i
        if progress is not None:
            progress(q.shape[0])
    return _finish(scores, idx)


def calibrate_probes(
    faiss: Any,
    mu: np.ndarray,
    centroids: np.ndarray,
    k: int,
    target_recall: float,
    rng: np.random.Generator,
    exclude_self: bool = True,
    sample: int = CALIBRATION_ROWS,
    max_probes: int = 16,
) -> tuple[int, float, float]:
    """The probe rule reaching ``target_recall`` (symmetric recall@k) on a random row sample.

    A row probes the lists among its ``nprobe`` nearest centroids whose score is within
    ``max_gap`` of its home centroid's. A true neighbour j of row i is found iff j's home list is
    probed by i or i's home list by j, so the recall of every rule follows from centroid scores
    of the sample and its exact neighbours; the smallest ``max_gap`` reaching the target is
    chosen (``nprobe`` starts at ``max_probes`` and doubles if that cap is too tight).
    Returns ``(nprobe, max_gap, recall_on_sample)``.
    """
    n = mu.shape[0]
    nlist = centroids.shape[0]
    rows = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    q = rows_f32(mu, rows)
    kk = min(n, k + 1 if exclude_self else k)
    _, nbr = exact_knn_of(faiss, mu, q, kk)
    if exclude_self:
        _, nbr = _exclude_self(np.zeros(nbr.shape, np.float32), nbr, rows, min(k, kk))
    valid = nbr >= 0
    if not valid.any():
        return 1, float("inf"), 1.0
    qi = np.nonzero(valid)[0]
    nb = nbr[valid]
    idx = np.arange(nb.size)
    cq = q @ centroids.T                    # [s, nlist]
    cn = rows_f32(mu, nb) @ centroids.T     # [pairs, nlist]
    home_q, home_n = cq.argmax(axis=1), cn.argmax(axis=1)
    to_n = cq[qi, home_n]                   # score, for row i, of neighbour j's home list
    to_q = cn[idx, home_q[qi]]              # score, for j, of i's home list
    rank_q = (cq[qi] > to_n[:, None]).sum(axis=1)
    rank_n = (cn > to_q[:, None]).sum(axis=1)
    gap_q = cq.max(axis=1)[qi] - to_n
    gap_n = cn.max(axis=1) - to_q
    m = min(max_probes, nlist)
    while True:
        best = np.minimum(np.where(rank_q < m, gap_q, np.inf), np.where(rank_n < m, gap_n, np.inf))
        if np.isfinite(best).mean() >= target_recall or m >= nlist:
            break
        m = min(nlist, 2 * m)
    best = np.sort(best)
    cut = best[min(best.size, int(np.ceil(target_recall * best.size))) - 1]
    max_gap = float(cut) if np.isfinite(cut) else float("inf")
    return m, max_gap, float((best <= max_gap).mean())


class _BlockScorer:
    """Scores query rows against one list's rows in float32 or offset bfloat16 (see module doc)."""

    def __init__(self, precision: str, offsets: np.ndarray | None) -> None:
        import torch

        self.torch = torch
        self.bf16 = precision == "bfloat16"
        self.offsets = offsets

    def base(self, block: np.ndarray) -> Any:
        t = self.torch.from_numpy(block)
        if not self.bf16:
            return t
        out = self.torch.empty((t.shape[0], t.shape[1] + 1), dtype=self.torch.bfloat16)
        out[:, :-1] = t
        out[:, -1] = 1.0
        return out

    def scores(self, rows: np.ndarray, block: np.ndarray, base: Any) -> np.ndarray:
        """``float32 [len(rows), len(base)]`` inner products of ``block`` (the rows' vectors) with ``base``."""
        torch = self.torch
        q = torch.from_numpy(block)
        if not self.bf16:
            return (q @ base.T).numpy()
        qa = torch.empty((q.shape[0], q.shape[1] + 1), dtype=torch.bfloat16)
        qa[:, :-1] = q
        qa[:, -1] = torch.from_numpy(-self.offsets[rows])
        shift = -qa[:, -1:].float()        # the bfloat16-rounded offset actually subtracted
        out = torch.empty((qa.shape[0], base.shape[0]), dtype=torch.float32)
        torch.add(qa @ base.T, shift, out=out)  # one pass: bfloat16 -> float32 and shift back
        return out.numpy()


def _merge_unique(
    d1: np.ndarray, i1: np.ndarray, d2: np.ndarray, i2: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the top k of two result lists (each sorted descending), each id kept once."""
    d = np.concatenate([d1, d2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    out_d = np.empty((d.shape[0], k), np.float32)
    out_i = np.empty((d.shape[0], k), np.int64)
    for start in range(0, d.shape[0], 65_536):  # bounded temporaries
        dd, ii = d[start:start + 65_536], i[start:start + 65_536]
        by_id = np.lexsort((-dd, ii), axis=1)  # ids grouped, best score first within an id
        ii_s = np.take_along_axis(ii, by_id, axis=1)
        dd_s = np.take_along_axis(dd, by_id, axis=1)
        dup = np.zeros(ii_s.shape, bool)
        dup[:, 1:] = (ii_s[:, 1:] == ii_s[:, :-1]) & (ii_s[:, 1:] >= 0)
        dd_s[dup] = -np.inf
        ii_s[dup] = -1
        top = np.argsort(-dd_s, axis=1, kind="stable")[:, :k]
        out_d[start:start + dd.shape[0]] = np.take_along_axis(dd_s, top, axis=1)
        out_i[start:start + dd.shape[0]] = np.take_along_axis(ii_s, top, axis=1)
    return out_d, out_i


def _knn_ivf(
    faiss: Any,
    mu: np.ndarray,
    k: int,
    exclude_self: bool,
    seed: int,
    progress: Progress,
    target_recall: float,
    nlist: int | None,
    nprobe: int | None,
    precision: str,
    stats: dict[str, Any] | None,
) -> tuple[np.ndarray, np.ndarray]:
    from m2m.index.kmeans import build_partition, default_nlist, train_centroids

    n = mu.shape[0]
    rng = np.random.default_rng(seed)
    nlist = default_nlist(n) if nlist is None else min(nlist, n)
    t0 = time.perf_counter()
    centroids = train_centroids(mu, nlist, niter=8, seed=seed, max_points_per_centroid=20)
    t1 = time.perf_counter()
    recall, max_gap = float("nan"), float("inf")
    if nprobe is None:
        nprobe, max_gap, recall = calibrate_probes(faiss, mu, centroids, k, min(1.0, target_recall + 0.01), rng,
                                                   exclude_self)
        log.info("knn: %d rows, nlist=%d, nprobe=%d, max_gap=%.4f (calibrated recall@%d %.3f)",
                 n, nlist, nprobe, max_gap, k, recall)
    nprobe = int(min(max(nprobe, 1), nlist))
    t2 = time.perf_counter()
    part = build_partition(faiss, mu, centroids, nprobe, resolve_precision("auto", mu.shape[1]), max_gap)
    t3 = time.perf_counter()

    kk = k + 1 if exclude_self else k
    heap = faiss.ResultHeap(n, kk, keep_max=True)
    total_work = n + part.visit_rows.size
    done_work = 0
    credited = 0

    def tick(work: int) -> None:
        nonlocal done_work, credited
        done_work += work
        if progress is not None:
            now = done_work * n // total_work
            if now > credited:
                progress(now - credited)
                credited = now

    # Pass 1: every list against itself, exact float32 (gives each row a first top-k).
    exact = _BlockScorer("float32", None)
    for lst in range(part.nlist):
        members = part.members(lst)
        if members.size:
            block = rows_f32(mu, members)
            heap.add_result_subset(members, exact.scores(members, block, exact.base(block)), members)
        tick(members.size)
    # Pass 2: the rows probing a list (ranks 1..nprobe-1) against it, each score used both ways.
    # A visitor i of list b gets (j, s_ij) for the members j of b in ``heap``; member j gets
    # (i, s_ij) in ``reverse``. Each heap sees a pair at most once (``heap``: i visits b once;
    # ``reverse``: only from b = home(j)), but a pair may reach j through both when j also
    # visits home(i): the two heaps are merged without duplicates at the end.
    offsets = heap.D[:, 0].astype(np.float32)  # heap root = current k-th best (or -FLT_MAX if not full)
    full = offsets >= -1.0
    offsets[~full] = np.median(offsets[full]) if full.any() else np.float32(0.5)
    reverse = faiss.ResultHeap(n, kk, keep_max=True)
    scorer = _BlockScorer(precision, offsets)
    for lst in range(part.nlist):
        members = part.members(lst)
        visitors = part.visitors(lst)
        if members.size and visitors.size:
            base = scorer.base(rows_f32(mu, members))
            for start in range(0, visitors.size, QUERY_CHUNK):
                rows = visitors[start:start + QUERY_CHUNK]
                s = scorer.scores(rows, rows_f32(mu, rows), base)
                heap.add_result_subset(rows, s, members)
                reverse.add_result_subset(members, np.ascontiguousarray(s.T), rows)
        tick(visitors.size)
    heap.finalize()
    reverse.finalize()
    scores, idx = _merge_unique(heap.D, heap.I, reverse.D, reverse.I, kk)
    t4 = time.perf_counter()
    log.debug("knn ivf seconds: train %.1f, calibrate %.1f, partition %.1f, search %.1f",
              t1 - t0, t2 - t1, t3 - t2, t4 - t3)
    if stats is not None:
        sizes = np.diff(part.member_lims)
        stats.update(method="ivf", nlist=part.nlist, nprobe=nprobe, max_gap=max_gap, calibrated_recall=recall,
                     precision=precision,
                     scored_pairs=int((sizes**2).sum() + (sizes * np.diff(part.visit_lims)).sum()),
                     seconds={"train": t1 - t0, "calibrate": t2 - t1, "partition": t3 - t2, "search": t4 - t3})
    if exclude_self:
        scores, idx = _exclude_self(scores, idx, np.arange(n), k)
    return _finish(scores, idx)


def knn(
    mu: np.ndarray,
    k: int,
    exclude_self: bool = True,
    exact_max_rows: int = 20_000,
    seed: int = 0,
    progress: Progress = None,
    *,
    threads: int | None = None,
    target_recall: float = 0.95,
    nlist: int | None = None,
    nprobe: int | None = None,
    precision: str = "auto",
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows of every row of ``mu`` by inner product.

    Args:
        mu: ``[N, d]`` float32 or float16 unit rows (float16 is converted chunk by chunk).
        k: neighbours per row.
        exclude_self: leave each row out of its own list (by index, so exact duplicates of a
            row still count as its neighbours).
        exact_max_rows: up to this many rows the result is exact; above it the IVF search runs
            (recall@k about ``target_recall``).
        seed: seed of the k-means and calibration samples (deterministic for a given seed,
            thread count and precision).
        progress: called with the number of rows finished since the last call (sums to N).
        threads: FAISS and torch threads (None: ``DEFAULT_THREADS``).
        target_recall: recall@k the IVF probe rule is calibrated for.
        nlist, nprobe: override the IVF list count (default about 2*sqrt(N)), or replace the
            calibrated rule by "probe exactly the ``nprobe`` nearest lists".
        precision: IVF scoring precision, "auto", "float32" or "bfloat16" (see module doc).
        stats: if a dict, filled with what was done (method, nlist, nprobe, calibrated recall,
            scored pairs, seconds per phase).

    Returns:
        ``(scores, idx)``: ``float32 [N, k]`` inner products sorted descending and
        ``int64 [N, k]`` row positions; missing neighbours (fewer than k other rows reachable)
        are ``-1`` with score ``-inf``.
    """
    mu = np.asarray(check_unit_rows(mu))
    k = check_int(k, "k")
    exact_max_rows = check_int(exact_max_rows, "exact_max_rows", 0)
    if not 0.0 < target_recall <= 1.0:
        raise ConfigError(f"target_recall must be in (0, 1], got {target_recall!r}")
    if nlist is not None:
        nlist = check_int(nlist, "nlist")
    if nprobe is not None:
        nprobe = check_int(nprobe, "nprobe")
    precision = resolve_precision(precision, mu.shape[1])
    n = mu.shape[0]
    if n == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    with compute_threads(threads) as faiss:
        if n <= exact_max_rows or n < 64:
            if stats is not None:
                stats.update(method="exact", scored_pairs=n * n)
            return _knn_exact(faiss, mu, k, exclude_self, progress)
        return _knn_ivf(faiss, mu, k, exclude_self, seed, progress, target_recall, nlist, nprobe, precision, stats)
