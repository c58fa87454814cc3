"""Spherical k-means of unit vectors (FAISS ``Kmeans(spherical=True)``) and the IVF partition built on it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from m2m._validate import check_int
from m2m.errors import ConfigError
from m2m.index.rows import check_unit_rows, rows_f32, writable_tensor
from m2m.index.runtime import compute_threads, resolve_precision

__all__ = [
    "Partition", "default_nlist", "gap_probes", "partition_of", "probe_lists", "spherical_kmeans",
    "top_centroids", "train_centroids",
]


def default_nlist(n: int, per_sqrt: float = 2.0) -> int:
    """IVF lists for ``n`` rows: about ``per_sqrt * sqrt(n)``, at most n // 32, at least 1.

    2*sqrt(n) suits the list search of ``m2m.consolidation.groups`` (docs/tuning.md); the kNN graph
    (``m2m.index.knn``) uses 1.5*sqrt(n).
    """
    return int(max(1, min(round(per_sqrt * math.sqrt(n)), n // 32)))


def train_centroids(
    mu: np.ndarray,
    n_clusters: int,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 64,
) -> np.ndarray:
    """Unit centroids ``float32 [n_clusters, d]`` of FAISS spherical k-means on a seeded row sample.

    The sample holds at most ``n_clusters * max_points_per_centroid`` rows. Uses the FAISS
    thread setting in force (see ``compute_threads``).
    """
    from m2m.index.runtime import require_faiss

    faiss = require_faiss()
    n, d = mu.shape
    if not isinstance(n_clusters, (int, np.integer)) or isinstance(n_clusters, bool) or not 1 <= n_clusters <= n:
        raise ConfigError(f"n_clusters must be an int in [1, {n}] (the row count), got {n_clusters!r}")
    niter = check_int(niter, "niter")
    max_points_per_centroid = check_int(max_points_per_centroid, "max_points_per_centroid")
    rng = np.random.default_rng(seed)
    n_train = min(n, int(n_clusters) * max_points_per_centroid)
    rows = np.arange(n) if n_train == n else np.sort(rng.choice(n, size=n_train, replace=False))
    km = faiss.Kmeans(
        d,
        int(n_clusters),
        niter=niter,
        spherical=True,
        seed=int(rng.integers(0, 2**31 - 1)),
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
        verbose=False,
    )
    km.train(rows_f32(mu, rows))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return centroids / np.maximum(norms, np.float32(1e-30))


def top_centroids(
    faiss: Any,
    mu: np.ndarray,
    centroids: np.ndarray,
    m: int,
    precision: str = "float32",
    progress: Callable[[int], None] | None = None,
    with_scores: bool = False,
) -> Any:
    """Indices ``int64 [N, m]`` of each row's ``m`` nearest centroids by inner product, nearest first.

    With ``with_scores`` returns ``(indices, scores float32 [N, m])``. ``precision="bfloat16"``
    ranks with bfloat16 products (about 1e-3 error): only near-ties between centroids can swap,
    which moves a row between two equally good lists.
    """
    import torch

    n = mu.shape[0]
    m = min(m, centroids.shape[0])
    dtype = torch.bfloat16 if resolve_precision(precision, centroids.shape[1]) == "bfloat16" else torch.float32
    cent = torch.from_numpy(centroids).to(dtype)
    ids = np.arange(centroids.shape[0], dtype=np.int64)
    out = np.empty((n, m), np.int64)
    out_scores = np.empty((n, m), np.float32) if with_scores else None
    step = 8192
    for start in range(0, n, step):
        block = torch.from_numpy(rows_f32(mu, slice(start, start + step))).to(dtype)
        scores = (block @ cent.T).float().numpy()
        heap = faiss.ResultHeap(block.shape[0], m, keep_max=True)
        heap.add_result_subset(np.arange(block.shape[0], dtype=np.int64), scores, ids)
        heap.finalize()
        out[start:start + block.shape[0]] = heap.I
        if out_scores is not None:
            out_scores[start:start + block.shape[0]] = heap.D
        if progress is not None:
            progress(block.shape[0])
    return (out, out_scores) if with_scores else out


def spherical_kmeans(
    mu: np.ndarray,
    n_clusters: int,
    niter: int = 20,
    seed: int = 0,
    *,
    max_points_per_centroid: int = 64,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster unit rows on the sphere (FAISS ``Kmeans(spherical=True)``).

    Centroids are trained on a seeded sample of at most ``n_clusters * max_points_per_centroid``
    rows (re-normalised every iteration), then every row is assigned to its nearest centroid by
    inner product, chunk by chunk (``progress`` gets the rows assigned).

    Returns:
        ``(centroids, assign)``: ``float32 [n_clusters, d]`` unit centroids and ``int64 [N]``
        each row's nearest centroid.
    """
    check_unit_rows(mu)
    with compute_threads(threads) as faiss:
        centroids = train_centroids(mu, n_clusters, niter, seed, max_points_per_centroid)
        assign = top_centroids(faiss, mu, centroids, 1, "float32", progress)[:, 0]
    return centroids, assign


@dataclass(frozen=True)
class Partition:
    """Rows bucketed by IVF list: each row's home list (nearest centroid) and the other lists it probes.

    Attributes:
        nlist: number of lists.
        probes: ``int64 [N, nprobe]`` each row's home list, then the other lists it probes
            (nearest first, or in index order with a finite ``max_gap``: see ``gap_probes``);
            ``-1`` pads rows probing fewer lists.
        member_order, member_lims: rows sorted by home list; list l holds
            ``member_order[member_lims[l]:member_lims[l+1]]``.
        visit_rows, visit_lims: the rows that probe list l but do not live in it, likewise.
    """

    nlist: int
    probes: np.ndarray
    member_order: np.ndarray
    member_lims: np.ndarray
    visit_rows: np.ndarray
    visit_lims: np.ndarray

    @property
    def home(self) -> np.ndarray:
        return self.probes[:, 0]

    def members(self, lst: int) -> np.ndarray:
        return self.member_order[self.member_lims[lst]:self.member_lims[lst + 1]]

    def visitors(self, lst: int) -> np.ndarray:
        return self.visit_rows[self.visit_lims[lst]:self.visit_lims[lst + 1]]


#: Rows ranked against the centroids at once by ``gap_probes`` (bounds the [rows, nlist] block).
PROBE_CHUNK = 256


def gap_probes(
    mu: np.ndarray,
    centroids: np.ndarray,
    nprobe: int,
    precision: str,
    max_gap: float,
    penalty: np.ndarray | None = None,
) -> np.ndarray:
    """``int64 [N, nprobe]``: per row its nearest centroid, then the others scoring within ``max_gap`` of it.

    At most ``nprobe`` per row: the nearest (ties: the lower index), then the others in index
    order (if more than ``nprobe - 1`` are within ``max_gap``, the nearest of them); ``-1``
    padded. With ``penalty`` (``float32 [nlist]``), the others are judged and ranked by their
    score minus their penalty (the home list by its plain score). Instead of a top-``nprobe``
    selection over all centroids, only the few centroids within ``max_gap`` of each row's best
    are extracted (a threshold on the score block).
    ``precision="bfloat16"`` ranks with bfloat16 products, as ``top_centroids``.
    """
    import torch

    n = mu.shape[0]
    nlist = centroids.shape[0]
    dtype = torch.bfloat16 if resolve_precision(precision, centroids.shape[1]) == "bfloat16" else torch.float32
    cent_t = torch.from_numpy(centroids).to(dtype).T
    width = min(nprobe, nlist)
    out = np.full((n, width), -1, np.int64)
    buf = torch.empty((PROBE_CHUNK, nlist), dtype=torch.float32)
    mask = np.empty((PROBE_CHUNK, nlist), bool)
    gap = np.float32(max_gap)
    for start in range(0, n, PROBE_CHUNK):
        block = writable_tensor(rows_f32(mu, slice(start, start + PROBE_CHUNK)))
        rows = block.shape[0]
        s_t = buf[:rows]
        if dtype == torch.float32:
            torch.matmul(block, cent_t, out=s_t)
        else:
            s_t.copy_(block.to(dtype) @ cent_t)
        s = s_t.numpy()
        home = s.argmax(axis=1)
        out[start:start + rows, 0] = home
        if width == 1:
            continue
        if not np.isfinite(gap) and width < nlist:
            # every centroid is within an infinite gap: the nearest width-1 others by (penalised)
            # score, as below, by a top-k instead of sorting all N x nlist candidates
            if penalty is not None:
                s -= penalty
            s[np.arange(rows), home] = -np.inf
            out[start:start + rows, 1:] = torch.topk(s_t, width - 1, dim=1, sorted=True).indices.numpy()
            continue
        cut = s[np.arange(rows), home] - gap
        if penalty is not None:
            s -= penalty
        m = mask[:rows]
        np.greater_equal(s, cut[:, None], out=m)
        m[np.arange(rows), home] = False
        flat = np.flatnonzero(m)
        ii, cc = np.divmod(flat, nlist)
        counts = np.bincount(ii, minlength=rows)
        col = np.arange(ii.size) - (np.cumsum(counts) - counts)[ii]
        over = counts[ii] >= width
        if over.any():  # too many within the gap: keep the nearest
            o_ii, o_cc = ii[over], cc[over]
            order = np.lexsort((o_cc, -s.ravel()[flat[over]], o_ii))
            o_ii, o_cc = o_ii[order], o_cc[order]
            rank = np.arange(o_ii.size) - np.searchsorted(o_ii, o_ii)
            keep = rank < width - 1
            out[start + o_ii[keep], 1 + rank[keep]] = o_cc[keep]
            ii, cc, col = ii[~over], cc[~over], col[~over]
        out[start + ii, 1 + col] = cc
    return out


def probe_lists(
    faiss: Any,
    mu: np.ndarray,
    centroids: np.ndarray,
    nprobe: int,
    precision: str = "float32",
    max_gap: float = float("inf"),
    penalty: np.ndarray | None = None,
) -> np.ndarray:
    """``int64 [N, <= nprobe]``: each row's home list (nearest centroid), then the other lists it probes.

    A row probes its ``nprobe`` nearest lists, except those whose centroid score is more than
    ``max_gap`` below its home centroid's (adaptive probing: rows deep inside their list probe
    few others, rows near borders more). A finite ``max_gap`` (below 2, the widest score range of
    unit vectors) uses ``gap_probes`` (with ``penalty``: per-list score penalties, see there);
    otherwise ``top_centroids``. ``partition_of`` buckets the rows by these lists.
    """
    if max_gap < 2.0 or penalty is not None:
        return gap_probes(mu, centroids, nprobe, precision, max_gap, penalty)
    return top_centroids(faiss, mu, centroids, nprobe, precision)


def partition_of(probes: np.ndarray, nlist: int, visited: np.ndarray | None = None) -> Partition:
    """The `Partition` of rows whose home list and probed lists are ``probes`` (``[N, p]``, -1 pads).

    ``visited``: a ``bool [nlist]`` mask of the lists whose visitors are recorded (default all); the
    visitors of the others are left out (a distributed search scores only the lists it owns).
    """
    key = np.uint16 if nlist < 2**16 else np.int64  # stable argsort of 16-bit keys is a radix sort
    home = probes[:, 0]
    member_order = np.argsort(home.astype(key), kind="stable")
    member_lims = np.concatenate([[0], np.cumsum(np.bincount(home, minlength=nlist))])
    width = max(1, probes.shape[1] - 1)
    seen = probes[:, 1:] >= 0
    if visited is not None:
        seen &= visited[np.maximum(probes[:, 1:], 0)]
    flat = np.flatnonzero(seen)  # the visits, row by row
    lists = probes[:, 1:].ravel()[flat]
    visit_rows = (flat // width)[np.argsort(lists.astype(key), kind="stable")]
    visit_lims = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=nlist))])
    return Partition(nlist, probes, member_order, member_lims, visit_rows, visit_lims)
