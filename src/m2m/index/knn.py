"""All-rows k-nearest-neighbour graph of unit vectors by inner product (cosine).

Up to ``exact_max_rows`` rows the graph is exact (FAISS ``IndexFlatIP``). Above it, an
inverted-file (IVF) partition search: spherical k-means centroids (FAISS) trained on a sample,
every row stored in the list of its nearest centroid ("home" list), every row probing the lists
among its ``nprobe`` nearest centroids whose score is within ``max_gap`` of its home centroid's
(adaptive probing: rows deep inside their list probe few others, rows near borders more), exact
inner products inside the probed lists. Because the queries are the stored rows themselves, the
search runs list by list, rows renumbered so that every list is a contiguous range: pass 1 scores
each list against itself (exact float32; the symmetric [m, m] matrix in blocks on and above its
diagonal) and gives every row a first top k in one FAISS result heap; pass 2 scores the rows
probing a list against it in one matrix product and uses each score in both directions: the pair
(i, j) is found when i probes j's list *or* j probes i's list, which halves the probes a recall
needs. A pass-2 score reaches a heap only if it beats that heap's current k-th best (its root):
a cheap comparison of the whole block keeps the ~1% that do, and only those are pushed; a pair
whose rows probe each other's lists is delivered once per row.

The probe rule is calibrated on every call: the neighbours of a random sample of rows are
computed by brute force (exact float32 scores; where bfloat16 is native, of candidates that a
bfloat16 pass selects, see ``rescored_knn_of``), and since a neighbour is found exactly when one
of the two rows probes the other's list, the recall of every rule follows from centroid scores --
the smallest ``max_gap`` reaching ``target_recall`` (+0.01 margin) is used.

Pass-2 scores are computed in float32, or in bfloat16 where the CPU multiplies it faster
(``precision="auto"``): each query's bfloat16 product is taken relative to an offset (its
current k-th best score, the root of its heap), so that the rounding of the bfloat16 *result* is
about 1e-4 near the decision boundary instead of 4e-3. What remains is the rounding of the
bfloat16 inputs, about 2**-9 * sqrt(3 / d) (1e-4 at d = 384): IVF scores found in pass 2 carry
that error (pass 1, the exact path and float32: exact to float32 rounding).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from m2m._validate import check_int
from m2m.errors import ConfigError
from m2m.index.calibration import calibrate_probes, size_penalty
from m2m.index.exact import Progress, finish_results, knn_exact
from m2m.index.rows import check_unit_rows, rows_f32, writable_tensor
from m2m.index.runtime import compute_threads, resolve_precision

__all__ = ["knn"]

log = logging.getLogger(__name__)

# The tuned constants below trade k-means and ranking work against scored pairs; the runs that
# chose them are in docs/tuning.md.

#: IVF lists per sqrt(rows) (``default_nlist``): more lists score fewer pairs but cost more
#: k-means and centroid ranking.
LISTS_PER_SQRT_ROWS = 1.5

#: k-means iterations of the IVF centroids (fewer: cheaper training, slightly more scored pairs).
KMEANS_ITERATIONS = 5

#: Slopes of the list-size penalty tried by the calibration (``calibrate_probes``), and the sample
#: rows per list that estimate list sizes.
SIZE_SLOPES = (0.0, 0.025, 0.05, 0.075)
SIZE_SAMPLE_PER_LIST = 16


#: Query rows scored against one list at a time (bounds the [rows, list] score block).
QUERY_CHUNK = 2048

#: The same for the offset-bfloat16 scores of the IVF search (a smaller block stays in cache).
BF16_CHUNK = 1024

#: Pass 1 of the IVF search multiplies a list with itself in up to OWN_PARTS x OWN_PARTS blocks
#: of at least OWN_PART_ROWS rows (only those on and above the diagonal: the matrix is symmetric).
OWN_PARTS = 8
OWN_PART_ROWS = 192

#: Query rows sharing one cut in the bfloat16 prefilter (``_ListSearch._hits_bf16``).
ROW_GROUP = 32


def _push(
    heap: Any, line: np.ndarray, nlines: int, line_rows: np.ndarray, ids: np.ndarray, scores: np.ndarray,
    wide: int = 16,
) -> None:
    """Add triples (heap row ``line_rows[line]``, ``ids``, ``scores``) to a FAISS ``ResultHeap``.

    ``line`` (values in ``[0, nlines)``) must be in ascending order. Each line's triples are laid
    out as one padded row (``-inf`` pads, which no heap accepts); if some line holds more than
    ``wide`` triples, those lines are padded separately, so that padding stays small.
    """
    if not line.size:
        return
    counts = np.bincount(line, minlength=nlines)
    col = np.arange(line.size) - (np.cumsum(counts) - counts)[line]
    width = int(counts.max())
    if width <= wide:
        groups = [(np.arange(nlines), slice(None), line, width)]
    else:
        big = counts > wide
        slot = np.empty(nlines, np.int64)
        groups = []
        for g in (~big, big):
            lines = np.flatnonzero(g)
            slot[lines] = np.arange(lines.size)
            t = g[line]
            groups.append((lines, t, slot[line[t]], int(counts[lines].max()) if lines.size else 0))
    for lines, t, at, w in groups:
        if w == 0:
            continue
        d = np.full((lines.size, w), -np.inf, np.float32)
        i = np.full((lines.size, w), -1, np.int64)
        flat = at * w + col[t]
        d.ravel()[flat] = scores[t]
        i.ravel()[flat] = ids[t]
        heap.add_result_subset(line_rows[lines], d, i)


class _ListSearch:
    """The list-by-list search of ``_knn_ivf`` (see the module doc), in "list order".

    Rows are renumbered by position in ``part.member_order`` so that every list's members are a
    contiguous range; the result heap (``self.heap``, FAISS ``ResultHeap`` of width ``kh``) holds
    positions and is mapped back to row numbers by ``result``.
    """

    def __init__(self, faiss: Any, mu: np.ndarray, part: Any, kh: int, exclude_self: bool, precision: str) -> None:
        import torch

        self.torch = torch
        self.faiss = faiss
        self.mu = mu
        self.part = part
        self.order = part.member_order
        self.lims = part.member_lims
        self.exclude_self = exclude_self
        self.bf16 = precision == "bfloat16"
        n, d = mu.shape
        self.d = d
        self.heap = faiss.ResultHeap(n, kh, keep_max=True)
        self.kh = kh
        sizes = np.diff(self.lims)
        self.home = np.repeat(np.arange(part.nlist, dtype=np.int32), sizes)  # list of each position
        self.pos = np.empty(n, np.int64)
        self.pos[self.order] = np.arange(n)
        # the lists each position visits (besides its home), padded with nlist: to drop double reports
        self.nlist = part.nlist
        visits = part.probes[self.order, 1:]
        self.visits = np.where(visits >= 0, visits, part.nlist).astype(np.int32)
        self.slot = np.zeros(part.nlist + 1, np.int64)  # list -> column of ``self.both`` (per list)
        self.both = np.zeros((0, 1), bool)
        # bfloat16 rows in list order plus an offset column (-offset for queries, 1 for lists)
        self.xb = torch.empty((n, d + 1), dtype=torch.bfloat16) if self.bf16 else None
        # reused buffers of the [visitors, members] score blocks (no page faults per block)
        largest = int(sizes.max()) if sizes.size else 0
        cells = (BF16_CHUNK if self.bf16 else QUERY_CHUNK) * largest
        self.sbuf = torch.empty(max(largest * largest, 0 if self.bf16 else cells), dtype=torch.float32)
        self.gbuf = np.empty((largest, d), np.float32)
        self.cut = np.empty(0 if self.bf16 else cells, np.float32)
        self.rbuf = torch.empty(cells if self.bf16 else 0, dtype=torch.bfloat16)
        self.qbuf = torch.empty((BF16_CHUNK if self.bf16 else 0, d + 1), dtype=torch.bfloat16)
        self.hit = np.empty(cells, bool)
        self.fallback = np.float32(0.5)

    def own_list(self, lst: int) -> None:
        """Pass 1: list ``lst`` against itself, exact float32 (gives each member a first top-k).

        The [m, m] score matrix is symmetric: a large list is cut into up to ``OWN_PARTS`` row
        ranges and only the blocks on and above the diagonal are multiplied, each block above
        it serving both of its ranges (its transpose feeds the other range's heaps).
        """
        a, b = int(self.lims[lst]), int(self.lims[lst + 1])
        m = b - a
        if not m:
            return
        if self.mu.dtype == np.float32 and self.mu.flags.c_contiguous:
            block = np.take(self.mu, self.order[a:b], axis=0, out=self.gbuf[:m])
        else:
            block = rows_f32(self.mu, self.order[a:b])
        t = writable_tensor(block)
        parts = max(1, min(OWN_PARTS, m // OWN_PART_ROWS))
        cuts = [m * p // parts for p in range(parts + 1)]
        for u in range(parts):
            ru = slice(cuts[u], cuts[u + 1])
            rows_u = np.arange(a + cuts[u], a + cuts[u + 1], dtype=np.int64)
            for w in range(u, parts):
                rw = slice(cuts[w], cuts[w + 1])
                rows_w = np.arange(a + cuts[w], a + cuts[w + 1], dtype=np.int64)
                s_t = self.sbuf[:rows_u.size * rows_w.size].view(rows_u.size, rows_w.size)
                self.torch.matmul(t[ru], t[rw].T, out=s_t)
                s = s_t.numpy()
                if u == w:
                    if self.exclude_self:
                        np.fill_diagonal(s, -np.inf)
                    self.heap.add_result_subset(rows_u, s, rows_u)
                else:
                    self.heap.add_result_subset(rows_u, s, rows_w)
                    self.heap.add_result_subset(rows_w, np.ascontiguousarray(s.T), rows_u)
        if self.xb is not None:
            self.xb[a:b, :self.d] = t

    def other_list(self, lst: int) -> None:
        """A list this search does not score (its members only visit lists that it does): their
        bfloat16 rows, which pass 2 reads as queries."""
        a, b = int(self.lims[lst]), int(self.lims[lst + 1])
        if self.xb is not None and b > a:
            self.xb[a:b, :self.d] = writable_tensor(rows_f32(self.mu, self.order[a:b]))

    def set_offsets(self) -> None:
        """After pass 1: the offset used for rows whose heap is not full yet (median k-th best)."""
        root = self.heap.D[:, 0]
        full = root >= -1.0  # heap root = k-th best, -FLT_MAX while not full
        self.fallback = np.float32(np.median(root[full]) if full.any() else 0.5)

    def visited_list(self, lst: int) -> int:
        """Pass 2: the rows visiting list ``lst`` against its members, each score used both ways.

        Visitor i gets (j, s_ij) for the members j, member j gets (i, s_ij) -- unless j also
        visits home(i), where j gets it as a visitor (each pair reaches each heap once). Only
        scores above the receiving row's current k-th best (its heap root) are pushed.
        Returns the number of visitors.
        """
        a, b = int(self.lims[lst]), int(self.lims[lst + 1])
        visitors = self.pos[self.part.visitors(lst)]
        if a == b or not visitors.size:
            return int(visitors.size)
        root = self.heap.D[:, 0]
        t_v = root[visitors]  # visitors get results only here in this list: current throughout
        # bfloat16: sort visitors by offset, so that row groups of a chunk share a tight cut
        offsets = np.where(t_v >= -1.0, t_v, self.fallback) if self.bf16 else t_v
        # rows whose heap is not full yet first (they take every score: a row group of their own)
        by = np.lexsort((offsets, t_v >= -1.0))
        visitors, t_v, offsets = visitors[by], t_v[by], offsets[by]
        base = self._base(a, b)
        self._mutual(a, b, visitors)
        step = BF16_CHUNK if self.bf16 else QUERY_CHUNK
        for start in range(0, visitors.size, step):
            sl = slice(start, start + step)
            if self.bf16:
                ii, jj, sv = self._hits_bf16(visitors[sl], t_v[sl], offsets[sl], base, root[a:b])
            else:
                ii, jj, sv = self._hits_f32(visitors[sl], t_v[sl], base, root[a:b])
            self._deliver(a, b, visitors[sl], t_v[sl], root[a:b], ii, jj, sv)
        return int(visitors.size)

    def _mutual(self, a: int, b: int, visitors: np.ndarray) -> None:
        """Set ``self.both[j - a, self.slot[h]]``: whether member j visits list h (h: a visitor's home)."""
        homes = np.unique(self.home[visitors])
        self.slot.fill(homes.size)  # other lists (and the pad of ``visits``): a column left False
        self.slot[homes] = np.arange(homes.size)
        both = np.zeros((b - a, homes.size + 1), bool)
        both[np.arange(b - a)[:, None], self.slot[self.visits[a:b]]] = True
        both[:, homes.size] = False
        self.both = both

    def _base(self, a: int, b: int) -> Any:
        """The members ``a:b`` as the right-hand side of the score products ([d(+1), m])."""
        if self.xb is None:
            return writable_tensor(rows_f32(self.mu, self.order[a:b])).T
        base = self.xb[a:b].clone()
        base[:, self.d] = 1.0
        return base.T

    def _block_roots(self, t_v: np.ndarray, block: Any, o: np.ndarray | None = None) -> np.ndarray:
        """``t_v`` with the rows whose heap is not full (sorted first) cut at their ``kh``-th best score of
        this block, a little below: no other score of the block can reach such a row's top k, so
        pushing only those is exact (the rows homed in lists another search scores start with empty
        heaps: without this, every score of their first list would be pushed). ``o``: the bfloat16
        block's offsets (its scores are ``block + o``)."""
        open_rows = int(np.count_nonzero(t_v < -1.0))
        if not open_rows or block.shape[1] <= self.kh:
            return t_v
        m = block.shape[1]
        kth = np.partition(block[:open_rows].float().numpy(), m - self.kh, axis=1)[:, m - self.kh]
        t_v = t_v.copy()
        if o is None:
            t_v[:open_rows] = np.nextafter(kth, np.float32(-np.inf))
        else:  # the cut is rebuilt as t_v - o: a margin for the float32 rounding of that round trip
            t_v[:open_rows] = kth + o[:open_rows] - np.float32(1e-5)
        return t_v

    def _hits_f32(
        self, v: np.ndarray, t_v: np.ndarray, base_t: Any, t_m: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(i, j, s_ij)`` of the float32 scores above min(root_i, root_j) (visitor i, member j)."""
        c, m = v.size, base_t.shape[1]
        s_t = self.sbuf[:c * m].view(c, m)
        self.torch.matmul(writable_tensor(rows_f32(self.mu, self.order[v])), base_t, out=s_t)
        s = s_t.numpy()
        t_v = self._block_roots(t_v, s_t)
        cut = self.cut[:c * m].reshape(c, m)
        np.minimum(t_v[:, None], t_m[None, :], out=cut)
        hit = self.hit[:c * m].reshape(c, m)
        np.greater(s, cut, out=hit)
        flat = np.flatnonzero(hit)
        ii, jj = np.divmod(flat, m)
        return ii, jj, s.ravel()[flat]

    def _hits_bf16(
        self, v: np.ndarray, t_v: np.ndarray, offsets: np.ndarray, base_t: Any, t_m: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(i, j, s_ij)`` of the offset-bfloat16 scores above min(root_i, root_j) (visitor i, member j).

        The product of query row i (offset column ``-o_i``, bfloat16-rounded) with a member
        (offset column 1) is ``r_ij = s_ij - o_i``, rounded to bfloat16; ``s_ij = r_ij + o_i``.
        A score can pass only if ``r_ij`` exceeds, for its group of ``ROW_GROUP`` rows, the cut
        ``min(min_i(root_i - o_i), root_j - max_i(o_i))`` (at most -1e-30, rounded down to
        bfloat16; ``r >= cut`` is tested, so that float32 rounding of the cut loses nothing).
        For a negative bfloat16 cut, ``r >= cut`` is ``bits(r) <= bits(cut)`` as unsigned 16-bit
        integers: one integer comparison per score, no float32 copy of the block. The few
        scores passing are checked exactly.
        """
        torch = self.torch
        c, m = v.size, base_t.shape[1]
        q = torch.index_select(self.xb, 0, torch.from_numpy(v), out=self.qbuf[:c])
        q[:, self.d] = torch.from_numpy(-offsets)
        o = -q[:, self.d].float().numpy()  # the bfloat16-rounded offsets
        r = self.rbuf[:c * m].view(c, m)
        torch.matmul(q, base_t, out=r)
        t_v = self._block_roots(t_v, r, o)
        bits = r.view(torch.int16).numpy().view(np.uint16)
        starts = np.arange(0, c, ROW_GROUP)
        cut = np.minimum(np.minimum.reduceat(t_v - o, starts)[:, None],
                         t_m[None, :] - np.maximum.reduceat(o, starts)[:, None])
        np.minimum(cut, np.float32(-1e-30), out=cut)
        u = cut.view(np.uint32)  # negative: rounding the magnitude up rounds down
        cut_bits = ((u >> 16) + ((u & 0xFFFF) != 0)).astype(np.uint16)
        hit = self.hit[:c * m].reshape(c, m)
        full = (c // ROW_GROUP) * ROW_GROUP
        if full:
            g = full // ROW_GROUP
            np.less_equal(bits[:full].reshape(g, ROW_GROUP, m), cut_bits[:g, None, :],
                          out=hit[:full].reshape(g, ROW_GROUP, m))
        if full < c:
            np.less_equal(bits[full:], cut_bits[-1][None, :], out=hit[full:])
        flat = np.flatnonzero(hit)
        ii, jj = np.divmod(flat, m)
        r32 = (bits.ravel()[flat].astype(np.uint32) << 16).view(np.float32)
        return ii, jj, r32 + o[ii]

    def _deliver(
        self, a: int, b: int, v: np.ndarray, t_v: np.ndarray, t_m: np.ndarray,
        ii: np.ndarray, jj: np.ndarray, sv: np.ndarray,
    ) -> None:
        """Push candidate scores ``sv`` of (visitor ``v[ii]``, member ``a + jj``) both ways (``ii`` ascending)."""
        _push(self.heap, ii, v.size, v, jj + a, sv)  # the heaps drop what is not above their root
        rev = np.flatnonzero(sv > t_m[jj])
        rev = rev[~self.both[jj[rev], self.slot[self.home[v[ii[rev]]]]]]
        rev = rev[np.argsort(jj[rev], kind="stable")]
        _push(self.heap, jj[rev], b - a, np.arange(a, b, dtype=np.int64), v[ii[rev]], sv[rev])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, idx)`` in row order, sorted descending (positions mapped back to rows)."""
        self.heap.finalize()
        scores = np.empty_like(self.heap.D)
        idx = np.empty_like(self.heap.I)
        scores[self.order] = self.heap.D
        idx[self.order] = np.where(self.heap.I >= 0, self.order[np.maximum(self.heap.I, 0)], -1)
        return scores, idx


def list_search(
    faiss: Any,
    mu: np.ndarray,
    part: Any,
    k: int,
    exclude_self: bool,
    precision: str,
    lists: np.ndarray | None = None,
    tick: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 and pass 2 of the IVF search (module doc) over ``lists`` (default all) of ``part``.

    Returns each row's best ``k`` candidates ``(scores, rows)`` found in those lists, descending
    (``-1`` / ``-FLT_MAX`` pads). With a subset of lists (the distributed engine, `m2m.ray.geometry`),
    the rows homed in other lists take part only as visitors of these: their heaps start empty, and
    ``part`` should record only these lists' visitors (`m2m.index.kmeans.partition_of`'s ``visited``).
    """
    search = _ListSearch(faiss, mu, part, k, exclude_self, precision)
    mine = np.arange(part.nlist) if lists is None else np.asarray(lists, np.int64)
    for lst in mine:
        search.own_list(int(lst))
        if tick is not None:
            tick(int(part.member_lims[lst + 1] - part.member_lims[lst]))
    if lists is not None:
        for lst in np.setdiff1d(np.arange(part.nlist), mine):
            search.other_list(int(lst))
    search.set_offsets()
    for lst in mine:
        work = search.visited_list(int(lst))
        if tick is not None:
            tick(work)
    return search.result()


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
    probe_budget: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    from m2m.index.kmeans import (
        default_nlist,
        gap_probes,
        partition_of,
        probe_lists,
        train_centroids,
    )

    n = mu.shape[0]
    rng = np.random.default_rng(seed)
    nlist = default_nlist(n, LISTS_PER_SQRT_ROWS) if nlist is None else min(nlist, n)
    t0 = time.perf_counter()
    centroids = train_centroids(mu, nlist, niter=KMEANS_ITERATIONS, seed=seed, max_points_per_centroid=20)
    t1 = time.perf_counter()
    recall, max_gap, penalty, slope = float("nan"), float("inf"), None, 0.0
    rank_precision = resolve_precision("auto", mu.shape[1])
    if nprobe is None:
        # list sizes estimated from a sample's home lists: probing a large list costs more
        sample = np.sort(rng.choice(n, size=min(n, SIZE_SAMPLE_PER_LIST * nlist), replace=False))
        homes = gap_probes(rows_f32(mu, sample), centroids, 1, rank_precision, float("inf"))[:, 0]
        sizes = np.bincount(homes, minlength=nlist) * (n / sample.size)
        nprobe, max_gap, recall, slope = calibrate_probes(
            faiss, mu, centroids, k, min(1.0, target_recall + 0.01), rng, exclude_self,
            sizes=sizes, slopes=SIZE_SLOPES, probe_cap=probe_budget)
        penalty = size_penalty(sizes, slope) if slope else None
        log.info("knn: %d rows, nlist=%d, nprobe=%d, max_gap=%.4f, size slope %.3f (calibrated recall@%d %.3f)",
                 n, nlist, nprobe, max_gap, slope, k, recall)
    nprobe = int(min(max(nprobe, 1), nlist))
    t2 = time.perf_counter()
    part = partition_of(probe_lists(faiss, mu, centroids, nprobe, rank_precision, max_gap, penalty), centroids.shape[0])
    t3 = time.perf_counter()

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

    scores, idx = list_search(faiss, mu, part, k, exclude_self, precision, tick=tick)
    scores, idx, refilled = refill_short_rows(faiss, mu, scores, idx, k, exclude_self)
    t4 = time.perf_counter()
    log.debug("knn ivf seconds: train %.1f, calibrate %.1f, partition %.1f, search %.1f",
              t1 - t0, t2 - t1, t3 - t2, t4 - t3)
    if stats is not None:
        sizes = np.diff(part.member_lims)
        stats.update(method="ivf", nlist=part.nlist, nprobe=nprobe, max_gap=max_gap, size_slope=slope, refilled=refilled,
                     calibrated_recall=recall, precision=precision,
                     scored_pairs=int((sizes**2).sum() + (sizes * np.diff(part.visit_lims)).sum()),
                     seconds={"train": t1 - t0, "calibrate": t2 - t1, "partition": t3 - t2, "search": t4 - t3})
    return finish_results(scores, idx)


def refill_short_rows(faiss: Any, mu: np.ndarray, scores: np.ndarray, idx: np.ndarray, k: int,
                      exclude_self: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Search exactly, over every row, the rows an IVF search left with fewer than ``k`` neighbours
    while the lake has more than ``k`` other rows. A row alone in its list that no other row's probes
    visit found nobody: no neighbour, NaN kappa, though thousands of rows lay at cosine 0.97 (a probing
    user, 3 rows of 24,000). Returns the results and how many rows were refilled."""
    from m2m.index.exact import drop_self, exact_knn_of

    n = mu.shape[0]
    short = np.flatnonzero((np.asarray(idx) < 0).any(axis=1)) if n - int(exclude_self) >= k else np.zeros(0, int)
    if short.size == 0:
        return scores, idx, 0
    scores, idx = np.array(scores, dtype=np.float32), np.array(idx, dtype=np.int64)
    want = min(n, k + int(exclude_self))
    for lo in range(0, short.size, 1024):
        rows = short[lo:lo + 1024]
        d, i = exact_knn_of(faiss, mu, rows_f32(mu, rows), want)
        if exclude_self:
            d, i = drop_self(d, i, rows, k)
        scores[rows, :d.shape[1]], idx[rows, :i.shape[1]] = d[:, :k], i[:, :k]
    return scores, idx, int(short.size)


#: Up to this many rows `knn` searches exactly (brute force beats an index there); the Ray engine
#: leaves such lakes to the local engine for the same reason
EXACT_MAX_ROWS = 20_000


def knn(
    mu: np.ndarray,
    k: int,
    exclude_self: bool = True,
    exact_max_rows: int = EXACT_MAX_ROWS,
    seed: int = 0,
    progress: Progress = None,
    *,
    threads: int | None = None,
    target_recall: float = 0.95,
    nlist: int | None = None,
    nprobe: int | None = None,
    precision: str = "auto",
    stats: dict[str, Any] | None = None,
    probe_budget: int | None = None,
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
        nlist, nprobe: override the IVF list count (default about 1.5*sqrt(N)), or replace the
            calibrated rule by "probe exactly the ``nprobe`` nearest lists".
        precision: IVF scoring precision, "auto", "float32" or "bfloat16" (see module doc).
        stats: if a dict, filled with what was done (method, nlist, nprobe, calibrated recall,
            scored pairs, seconds per phase).
        probe_budget: at most this many IVF lists probed per row, whatever ``target_recall`` asks
            (None: no cap). Bounds the time on data without cluster structure, where reaching the
            target means probing every list (an N^2 scan); the recall the capped rule reaches is
            logged and reported in ``stats``.

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
    if probe_budget is not None:
        probe_budget = check_int(probe_budget, "probe_budget")
    precision = resolve_precision(precision, mu.shape[1])
    n = mu.shape[0]
    if n == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    with compute_threads(threads) as faiss:
        if n <= exact_max_rows or n < 64:
            if stats is not None:
                stats.update(method="exact", scored_pairs=n * n)
            return knn_exact(faiss, mu, k, exclude_self, progress)
        return _knn_ivf(faiss, mu, k, exclude_self, seed, progress, target_recall, nlist, nprobe, precision, stats,
                        probe_budget)
