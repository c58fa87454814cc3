"""Near-duplicate consolidation (SemDeDup-style): group rows by cosine >= similarity within a label, merge groups.

Groups are the connected components of the graph {(i, j): cos(mu_i, mu_j) >= similarity and
label_i == label_j}. Small inputs are searched exhaustively (blocked matrix products). Large
inputs use an IVF partition: spherical k-means centroids (FAISS), every row stored in its
nearest centroid's list and compared, with exact float32 cosines, to the rows of its ``nprobe``
nearest lists. A pair is found when either row probes the other's list; ``nprobe`` is
calibrated so that at least ``target_recall`` of the close pairs of a random sample are found
(the pairs of the sample above ``similarity``, or if fewer than 100, its 100 closest nearest
neighbour pairs -- farther pairs are harder to find, so that choice errs on the safe side).
Every pair reported is a true edge (exact cosine), so groups are never merged falsely; a missed
edge can only split a group.

Components are computed with a vectorised union-find (roots always the smallest member, so
group ids come out ordered by their first row), fed block by block: memory stays bounded
even when a block is all duplicates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from m2m._validate import check_int
from m2m.errors import ConfigError, InvalidEmbeddingError
from m2m.index.exact import exact_knn_of
from m2m.index.rows import check_unit_rows, rows_f32
from m2m.index.runtime import compute_threads

__all__ = [
    "ConsolidationReport",
    "connected_components",
    "consolidate_arrays",
    "find_duplicate_groups",
    "label_codes",
    "merge_groups",
    "similarity_threshold",
]

log = logging.getLogger(__name__)

Progress = Callable[[int], None] | None

#: Similarities are compared in float32; 1.0 means "identical up to float32 rounding".
MAX_THRESHOLD = 1.0 - 1e-6

#: Rows per block of the exhaustive search (bounds the [block, N] score matrix).
BLOCK_ROWS = 2048


@dataclass(frozen=True)
class ConsolidationReport:
    """What a consolidation did: row counts, merged groups, total alpha before/after, wall time."""

    rows_before: int
    rows_after: int
    groups_merged: int
    alpha_before: float
    alpha_after: float
    seconds: float


def label_codes(labels: Any, n: int) -> np.ndarray | None:
    """Labels as ``int64 [n]`` codes (equal labels <-> equal codes), or None when ``labels`` is None."""
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise InvalidEmbeddingError(f"labels must have shape ({n},), got {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64, copy=False)
    try:
        return np.unique(arr, return_inverse=True)[1].astype(np.int64).reshape(n)
    except TypeError as exc:
        raise InvalidEmbeddingError(f"labels must be mutually comparable (ints or strings): {exc}") from exc


class _Forest:
    """Union-find over ``n`` nodes with vectorised unions; a root is always its tree's smallest node."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, nodes: np.ndarray) -> np.ndarray:
        parent = self.parent
        roots = parent[nodes]
        while True:
            up = parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        parent[nodes] = roots  # compress the paths of the queried nodes
        return roots

    def union(self, u: np.ndarray, v: np.ndarray) -> None:
        """Join the trees of every pair (u[i], v[i])."""
        while u.size:
            ru, rv = self.find(u), self.find(v)
            differ = ru != rv
            if not differ.any():
                return
            u, v, ru, rv = u[differ], v[differ], ru[differ], rv[differ]
            # hook the larger root under the smaller; pairs whose root was hooked elsewhere
            # in this round are retried with their new roots
            np.minimum.at(self.parent, np.maximum(ru, rv), np.minimum(ru, rv))

    def roots(self) -> np.ndarray:
        parent = self.parent
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                return parent
            parent = up


def connected_components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Component id ``int64 [n]`` of every node of the graph with edges (u[i], v[i]).

    Ids are 0..G-1 in the order of each component's smallest node.
    """
    forest = _Forest(n)
    forest.union(np.asarray(u, np.int64), np.asarray(v, np.int64))
    return _group_ids(forest.roots())


def _group_ids(roots: np.ndarray) -> np.ndarray:
    return np.unique(roots, return_inverse=True)[1].astype(np.int64).reshape(roots.shape)


def similarity_threshold(similarity: Any) -> float:
    """The float32-comparable threshold of a similarity in (0, 1 - 1e-6] or 1.0 (-> 1 - 1e-6). Between
    them it is refused: it was taken as 1 - 1e-6 silently (0.9999999 merged pairs at cosine 0.9999995),
    and stored float32 rows carry ~1e-7 of rounding, so such cosines are not told apart."""
    if not isinstance(similarity, (int, float, np.floating)) or isinstance(similarity, bool) or not (
        0.0 < float(similarity) <= 1.0
    ):
        raise ConfigError(f"similarity must be a float in (0, 1], got {similarity!r}")
    if MAX_THRESHOLD < float(similarity) < 1.0:
        raise ConfigError(f"similarity {similarity!r} lies between 1 - 1e-6 and 1, closer than stored float32 "
                          "rows' rounding tells apart: give 1.0 (identical up to rounding, cosine >= 1 - 1e-6) "
                          "or at most 0.999999")
    return min(float(similarity), MAX_THRESHOLD)


def _hits(q: np.ndarray, c: np.ndarray, thr: float) -> np.ndarray:
    """``q @ c.T >= thr`` for float32 unit rows, with the pairs within float32 rounding of ``thr``
    decided again by their cosine in float64, so the edge set does not depend on the summation order
    of the product."""
    import torch

    s = (torch.from_numpy(q) @ torch.from_numpy(c).T).numpy()
    hits = s >= thr
    tol = 2 * q.shape[1] * float(np.finfo(np.float32).eps)  # bound on a float32 dot of unit rows
    a, b = np.nonzero(np.abs(s - thr) <= tol)
    if a.size:  # the cosine of the rows as stored (norms 1 +- 6e-8: their product alone moved it by 1e-7)
        qa, cb = q[a].astype(np.float64), c[b].astype(np.float64)
        exact = np.einsum("ij,ij->i", qa, cb) / (np.linalg.norm(qa, axis=1) * np.linalg.norm(cb, axis=1))
        hits[a, b] = exact >= thr
    return hits


#: `_hits` under a public name, for the distributed duplicate search (`m2m.ray.geometry`).
threshold_hits = _hits


def _add_edges(forest: _Forest, rows: np.ndarray, cols: np.ndarray, hits: np.ndarray, codes: np.ndarray | None) -> None:
    """Union the pairs (rows[a], cols[b]) for every True hits[a, b] (different rows, same label)."""
    a, b = np.nonzero(hits)
    if a.size == 0:
        return
    u, v = rows[a], cols[b]
    keep = u != v
    if codes is not None:
        keep &= codes[u] == codes[v]
    forest.union(u[keep], v[keep])


def _groups_exact(mu: np.ndarray, codes: np.ndarray | None, thr: float, progress: Progress) -> np.ndarray:
    n = mu.shape[0]
    forest = _Forest(n)
    for start in range(0, n, BLOCK_ROWS):
        stop = min(n, start + BLOCK_ROWS)
        q = rows_f32(mu, slice(start, stop))
        for cstart in range(start, n, 4 * BLOCK_ROWS):  # upper triangle only, bounded blocks
            c = rows_f32(mu, slice(cstart, cstart + 4 * BLOCK_ROWS))
            hits = _hits(q, c, thr)
            _add_edges(forest, np.arange(start, stop), np.arange(cstart, cstart + c.shape[0]), hits, codes)
        if progress is not None:
            progress(stop - start)
    return _group_ids(forest.roots())


def calibrate_pair_probes(
    faiss: Any,
    mu: np.ndarray,
    centroids: np.ndarray,
    thr: float,
    target_recall: float,
    rng: np.random.Generator,
    sample: int = 512,
    min_pairs: int = 100,
    nearest: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[int, float]:
    """Smallest nprobe finding ``target_recall`` of a sample's close pairs (see module doc).

    ``nearest``: ``(rows, score, nbr)``, the sample rows with the exact score and position (into
    ``mu``, -1 where none) of each one's nearest other row, computed elsewhere (e.g. by Ray tasks);
    the sample search is then skipped and ``mu`` need only hold those rows.
    """
    from m2m.index.exact import drop_self

    n = mu.shape[0]
    nlist = centroids.shape[0]
    if nearest is None:
        rows = np.sort(rng.choice(n, size=min(n, sample), replace=False))
        q = rows_f32(mu, rows)
        s, nb = exact_knn_of(faiss, mu, q, min(n, 2))
        s, nb = drop_self(s, nb, rows, 1)
        s, nb = s[:, 0], nb[:, 0]
    else:
        rows, s, nb = nearest
        q = rows_f32(mu, rows)
    ok = nb >= 0
    s, nb, qi = s[ok], nb[ok], np.nonzero(ok)[0]
    if s.size == 0:
        return 1, 1.0
    close = s >= thr
    if close.sum() < min_pairs:
        close = s >= np.sort(s)[::-1][min(min_pairs, s.size) - 1]
    qi, nb = qi[close], nb[close]
    cq = q[qi] @ centroids.T
    cn = rows_f32(mu, nb) @ centroids.T
    home_q, home_n = cq.argmax(axis=1), cn.argmax(axis=1)
    idx = np.arange(qi.size)
    rank_q = (cq > cq[idx, home_n][:, None]).sum(axis=1)
    rank_n = (cn > cn[idx, home_q][:, None]).sum(axis=1)
    best = np.minimum(rank_q, rank_n)
    recall = np.cumsum(np.bincount(best, minlength=nlist)) / best.size
    nprobe = min(int(np.searchsorted(recall, target_recall) + 1), nlist)
    return nprobe, float(recall[nprobe - 1])


def _groups_ivf(
    faiss: Any,
    mu: np.ndarray,
    codes: np.ndarray | None,
    thr: float,
    seed: int,
    progress: Progress,
    nlist: int | None,
    nprobe: int | None,
    target_recall: float,
) -> np.ndarray:
    from m2m.index.kmeans import default_nlist, partition_of, probe_lists, train_centroids
    from m2m.index.knn import QUERY_CHUNK
    from m2m.index.runtime import resolve_precision

    n = mu.shape[0]
    rng = np.random.default_rng(seed)
    nlist = min(n, default_nlist(n) if nlist is None else nlist)
    centroids = train_centroids(mu, nlist, niter=10, seed=seed, max_points_per_centroid=24)
    if nprobe is None:
        nprobe, recall = calibrate_pair_probes(faiss, mu, centroids, thr, target_recall, rng)
        nprobe = max(nprobe, 2)
        log.info("duplicates: %d rows, nlist=%d, nprobe=%d (calibrated pair recall %.3f)", n, nlist, nprobe, recall)
    part = partition_of(probe_lists(faiss, mu, centroids, min(nprobe, nlist), resolve_precision("auto", mu.shape[1])),
                        centroids.shape[0])
    forest = _Forest(n)
    total = n + part.visit_rows.size
    done = credited = 0
    for lst in range(part.nlist):
        members = part.members(lst)
        if members.size:
            base = rows_f32(mu, members)
            # members against members: only the blocks on and above the diagonal (``_hits`` is
            # symmetric: pairs near the threshold are decided in float64, whatever the order)
            for start in range(0, members.size, QUERY_CHUNK):
                stop = start + QUERY_CHUNK
                _add_edges(forest, members[start:stop], members[start:], _hits(base[start:stop], base[start:], thr),
                           codes)
            # then the rows probing this list against its members
            visitors = part.visitors(lst)
            for start in range(0, visitors.size, QUERY_CHUNK):
                chunk = visitors[start:start + QUERY_CHUNK]
                _add_edges(forest, chunk, members, _hits(rows_f32(mu, chunk), base, thr), codes)
        done += members.size + part.visitors(lst).size
        if progress is not None and done * n // total > credited:
            progress(done * n // total - credited)
            credited = done * n // total
    return _group_ids(forest.roots())


def find_duplicate_groups(
    mu: np.ndarray,
    labels: np.ndarray | None,
    similarity: float,
    seed: int = 0,
    progress: Progress = None,
    *,
    exact_max_rows: int = 20_000,
    nlist: int | None = None,
    nprobe: int | None = None,
    target_recall: float = 0.99,
    threads: int | None = None,
) -> np.ndarray:
    """Group id ``int64 [N]`` of every row: connected components of cos >= ``similarity``, same label.

    Args:
        mu: ``[N, d]`` float32/float16 unit rows.
        labels: ``[N]`` labels (ints, strings) or None (no label constraint).
        similarity: cosine threshold in (0, 1]; compared in float32 (1.0 means identical up to
            float32 rounding).
        seed: seed of the k-means and calibration samples.
        progress: called with rows finished since the last call (sums to N).
        exact_max_rows: up to this many rows the search is exhaustive (every edge found).
        nlist, nprobe: IVF list count (default about 2*sqrt(N)) and probes (default calibrated).
        target_recall: fraction of a sample's close pairs the calibrated ``nprobe`` must find.
        threads: FAISS/torch threads (None: the m2m.index default).

    Returns:
        Group ids 0..G-1, numbered in the order of each group's first row (so a row that is
        alone in its group gets its own id and ``group[0] == 0``).
    """
    mu = np.asarray(check_unit_rows(mu))
    thr = similarity_threshold(similarity)
    n = mu.shape[0]
    codes = label_codes(labels, n)
    exact_max_rows = check_int(exact_max_rows, "exact_max_rows", 0)
    if nlist is not None:
        nlist = check_int(nlist, "nlist")
    if nprobe is not None:
        nprobe = check_int(nprobe, "nprobe")
    if not 0.0 < target_recall <= 1.0:
        raise ConfigError(f"target_recall must be in (0, 1], got {target_recall!r}")
    if n == 0:
        return np.zeros(0, np.int64)
    with compute_threads(threads) as faiss:
        if n <= exact_max_rows:
            return _groups_exact(mu, codes, thr, progress)
        return _groups_ivf(faiss, mu, codes, thr, seed, progress, nlist, nprobe, target_recall)


def merge_groups(
    group: np.ndarray,
    mu: np.ndarray,
    alpha: np.ndarray,
    kappa: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Merge every group of rows into one splat.

    Groups are numbered in the order of their first row (ids from ``find_duplicate_groups``
    already are; any other integer ids are renumbered that way).

    Returns a dict with, for the G groups:
        ``mu`` float32 [G, d]: alpha-weighted mean direction (accumulated in float64,
        normalised); a group of one keeps its row bit for bit. If a group's weighted vectors
        cancel (resultant below 1e-6 of its alpha, only possible at low similarities), its
        heaviest member's direction is used and a warning is logged.
        ``alpha`` float32 [G]: sum of the members' alphas in float64, rounded once, so the
        total is conserved up to float32 rounding; ``alpha64`` float64 [G]: the unrounded sums.
        ``size`` int64 [G]; ``representative`` int64 [G]: each group's first (smallest) row,
        ascending; ``row_group`` int64 [N]: the group of every input row; ``members`` int64 [N]
        and ``member_offsets`` int64 [G+1]: rows of group g are
        ``members[member_offsets[g]:member_offsets[g+1]]`` (ascending).
        ``kappa`` float32 [G] (only when ``kappa`` is given): singletons keep theirs, merged
        groups get NaN (to be re-estimated from the new neighbourhood).
    """
    import torch

    mu = np.asarray(mu)
    if mu.ndim != 2 or mu.dtype not in (np.float32, np.float16):
        raise InvalidEmbeddingError(f"mu must be a float32/float16 array [N, d], got {mu.dtype} {mu.shape}")
    n, d = mu.shape
    group = np.asarray(group)
    alpha = np.asarray(alpha, dtype=np.float64)
    if group.shape != (n,) or not np.issubdtype(group.dtype, np.integer):
        raise ConfigError(f"group must be an integer array of shape ({n},), got {group.dtype} {group.shape}")
    if alpha.shape != (n,) or not np.isfinite(alpha).all() or (alpha <= 0).any():
        raise InvalidEmbeddingError(f"alpha must be {n} finite positive values")
    _, first, row_group = np.unique(group, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")  # renumber by first row
    row_group = rank[row_group.reshape(n)].astype(np.int64)
    g = first.size
    representative = np.sort(first).astype(np.int64)
    size = np.bincount(row_group, minlength=g).astype(np.int64)
    members = np.argsort(row_group, kind="stable").astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
    alpha64 = np.bincount(row_group, weights=alpha, minlength=g)
    heavy = alpha64 > np.finfo(np.float32).max  # observed: stored as alpha = +inf, which add_splats refuses
    if heavy.any():
        h = int(np.argmax(heavy))
        raise InvalidEmbeddingError(f"merging {int(size[h])} rows (row {int(representative[h])} and its near-duplicates) "
                                    f"gives them an alpha of {alpha64[h]:.3g}, beyond float32 (3.4e38): nothing was "
                                    "merged; rescale alpha (only its ratios matter to weights and mixtures)")

    out_mu = rows_f32(mu, representative) if g else np.zeros((0, d), np.float32)
    multi = np.nonzero(size > 1)[0]
    if multi.size:
        slot = np.full(g, -1, np.int64)
        slot[multi] = np.arange(multi.size)
        rows = members[np.repeat(size > 1, size)]  # rows of multi-member groups, grouped
        acc = torch.zeros((multi.size, d), dtype=torch.float64)
        for start in range(0, rows.size, 65_536):
            r = rows[start:start + 65_536]
            w = torch.from_numpy(alpha[r])
            weighted = torch.from_numpy(rows_f32(mu, r)).double() * w[:, None]
            acc.index_add_(0, torch.from_numpy(slot[row_group[r]]), weighted)
        vec = acc.numpy()
        norm = np.linalg.norm(vec, axis=1)
        cancel = norm < 1e-6 * alpha64[multi]
        if cancel.any():
            log.warning("%d merged groups have a near-zero resultant; using their heaviest member's direction",
                        int(cancel.sum()))
            for j in np.nonzero(cancel)[0]:  # rare degenerate groups only
                grp_rows = members[offsets[multi[j]]:offsets[multi[j] + 1]]
                vec[j] = mu[grp_rows[np.argmax(alpha[grp_rows])]]
                norm[j] = np.linalg.norm(vec[j])
        out_mu[multi] = (vec / norm[:, None]).astype(np.float32)
    result = {
        "mu": out_mu,
        "alpha": alpha64.astype(np.float32),
        "alpha64": alpha64,
        "size": size,
        "representative": representative,
        "row_group": row_group,
        "members": members,
        "member_offsets": offsets,
    }
    if kappa is not None:
        k = np.asarray(kappa, dtype=np.float32)
        if k.shape != (n,):
            raise InvalidEmbeddingError(f"kappa must have shape ({n},), got {k.shape}")
        result["kappa"] = np.where(size > 1, np.float32(np.nan), k[representative]).astype(np.float32)
    return result


def consolidate_arrays(
    mu: np.ndarray,
    alpha: np.ndarray,
    labels: np.ndarray | None = None,
    similarity: float = 0.95,
    kappa: np.ndarray | None = None,
    seed: int = 0,
    progress: Progress = None,
    **search_options: Any,
) -> tuple[dict[str, np.ndarray], ConsolidationReport]:
    """``find_duplicate_groups`` then ``merge_groups``; returns the merged arrays and a report."""
    t0 = time.perf_counter()
    group = find_duplicate_groups(mu, labels, similarity, seed=seed, progress=progress, **search_options)
    merged = merge_groups(group, mu, alpha, kappa)
    report = ConsolidationReport(
        rows_before=int(mu.shape[0]),
        rows_after=int(merged["size"].size),
        groups_merged=int((merged["size"] > 1).sum()),
        alpha_before=float(np.asarray(alpha, np.float64).sum()),
        alpha_after=float(merged["alpha"].astype(np.float64).sum()),
        seconds=time.perf_counter() - t0,
    )
    return merged, report
