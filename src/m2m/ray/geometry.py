"""Distributed geometry: the kNN graph + kappa, and near-duplicate groups, as Ray tasks over a lake.

The same IVF method as the local engine (`m2m.index.knn`, `m2m.consolidation.groups`), cut into stages
that never need the whole lake in one process:

1. Driver: spherical k-means centroids on a row sample (`m2m.index.kmeans.train_centroids`), then the
   probe rule calibrated on a sample whose exact neighbours are found by one Ray task per shard range
   (`m2m.index.calibration.calibrate_probes` / `m2m.consolidation.groups.calibrate_pair_probes`, given those
   neighbours).
2. Plan (driver): the lists are grouped into list-owner tasks by how often a row sample probes them
   together (`m2m.ray.owners.group_lists`, balanced by each list's scoring cost). Route (one task per
   shard range, reading its shards from the lake): every row is shipped once to each owner task
   holding its home list or a list it probes (`m2m.index.kmeans.probe_lists`: `gap_probes` /
   `top_centroids`), with those probes, through Ray's object store.
3. Lists (one task per owner): kNN: the local engine's list search (`m2m.index.knn.list_search`) over
   the lists the task owns, rows homed elsewhere taking part as visitors (each pair reaches each row
   once across all tasks), per-row top-k candidates shuffled back to finish ranges; duplicates: the
   edges cos >= threshold with equal labels, reduced to a spanning forest per task.
4. kNN: one task per finish range (``FINISH_BYTES``) merges each row's candidates (one heap) and
   estimates kappa (`m2m.geometry.kappa.neighbourhood_kappa`); then one task per range hands every
   other range the kappa, alpha and label of that range's neighbours it holds, and one task per range
   writes the range's geometry sidecars with those neighbour terms, the columns the local engine writes
   (`m2m.lake.neighbourhood.write_geometry`). Duplicates: the driver takes connected components.

The driver publishes the result as one commit (`Lake.commit`); a failed task fails the commit,
which removes the files written so far (running tasks are cancelled first).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np

from m2m.errors import InternalError
from m2m.index.knn import EXACT_MAX_ROWS
from m2m.lake import summary as lake_stats
from m2m.lake.commit import adopt_new_files, removed_on_failure
from m2m.lake.fs import LakeFS
from m2m.lake.manifest import Manifest, ShardEntry
from m2m.lake.reader import Snapshot
from m2m.ray import gather, require_ray

logger = logging.getLogger(__name__)

Progress = Callable[[int], None] | None

#: Member rows scored against a list's rows at once (bounds a task's [rows, list] score block).
MEMBER_CHUNK = 4096

#: Bytes of vectors one task handles at most (about): a shard range read by a route/finish task, or
#: the rows (members and visitors) shuffled to one list-owner task. More data -> more tasks.
TASK_BYTES = 256 << 20

#: Bytes of the vectors routed to one list-owner task (about). Each task searches its lists with the
#: local engine's search, whose work is the same however the lists are cut, but the rows homed in
#: other tasks' lists start there with no candidates: more tasks, more such rows, more copies shipped.
#: At 300k x 384 the list tasks took 8.4 / 10.4 / 12.5 s in all as 1 / 4 / 11 tasks (docs/ray.md).
LIST_TASK_BYTES = 1 << 30

#: Bytes of a finish task's vectors (about): its own rows' and their neighbours' living in other ranges,
#: at most min(other rows, k x own rows) of those. Every range reads the shards its outside neighbours
#: live in, so fewer, larger ranges read less (`_finish_ranges`).
FINISH_BYTES = 2 << 30

#: Sample rows per IVF list whose probes plan the list-owner tasks of the duplicate search (`_owners`).
PLAN_SAMPLE_PER_LIST = 16

#: Lakes of at most this many rows get ``estimate_kappa(engine="ray")`` from the local engine in the
#: driver: it searches them exactly (`m2m.index.knn.knn`'s ``exact_max_rows``) in less time than fresh
#: Ray workers take to import torch (docs/ray.md has the measurements).
LOCAL_MAX_ROWS = EXACT_MAX_ROWS


def local_max_rows() -> int:
    """`LOCAL_MAX_ROWS`, read when called (``consolidate(engine="ray")`` applies it too)."""
    return LOCAL_MAX_ROWS


# ---------------------------------------------------------------------------- small helpers
def _workers(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _task_count(ray: Any, nbytes: float, task_bytes: int = TASK_BYTES) -> int:
    """Tasks for a stage over ``nbytes``: two per CPU of the cluster, more when a task would exceed ``task_bytes``."""
    return max(2 * _workers(ray), int(np.ceil(nbytes / task_bytes)))


def _finish_ranges(n: int, k: int, row_bytes: float, workers: int) -> int:
    """Finish ranges: at least one per worker, and as few as keep a task's vectors (its rows plus at most
    min(other rows, k x its rows) outside neighbours) within ``FINISH_BYTES``."""
    r = max(1, workers)
    while r < n:
        own = n / r
        if (own + min(n - own, k * own)) * row_bytes <= FINISH_BYTES:
            break
        r = max(r + 1, int(r * 1.25))
    return min(r, max(1, n))


def shard_ranges(manifest: Manifest, parts: int) -> list[tuple[int, int]]:
    """Contiguous shard index ranges ``[lo, hi)`` of about equal rows, at most ``parts`` of them."""
    counts = np.array([s.rows for s in manifest.shards], np.int64)
    if counts.size == 0:
        return []
    parts = max(1, min(parts, counts.size))
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, parts) / parts, side="left") + 1
    edges = np.unique(np.concatenate([[0], cuts, [counts.size]]))
    return [(int(a), int(b)) for a, b in pairwise(edges) if b > a]


def _range_mu(snap: Snapshot, lo: int, hi: int) -> np.ndarray:
    """float32 rows of shards ``[lo, hi)`` (float16 renormalised as ``rows_f32`` does)."""
    from m2m.index.rows import rows_f32

    mu = np.concatenate([snap.column(s, "mu") for s in range(lo, hi)])
    return rows_f32(mu, slice(None))


def _one_or_many(outs: list[Any]) -> Any:
    """A task's return for ``num_returns=len(outs)`` (Ray wants the bare value when it is 1)."""
    return outs[0] if len(outs) == 1 else tuple(outs)


def _as_list(refs: Any, n: int) -> list[Any]:
    return [refs] if n == 1 else list(refs)


def _owners(faiss: Any, ray: Any, sample_mu: np.ndarray, centroids: np.ndarray, nprobe: int, precision: str,
            max_gap: float, penalty: np.ndarray | None, nbytes: float) -> tuple[np.ndarray, float]:
    """Owner task of every list (`m2m.ray.owners.group_lists`, from a row sample's probes by the rule the
    route tasks use) and the copies of each row the routing will ship, estimated on that sample. The
    owner tasks are sized for the lake's vectors times those copies (``LIST_TASK_BYTES`` each at most)."""
    from m2m.index.kmeans import probe_lists
    from m2m.ray.owners import group_lists, owners_per_row

    nlist = centroids.shape[0]
    probes = probe_lists(faiss, sample_mu, centroids, nprobe, precision, max_gap, penalty)
    parts = max(1, min(nlist, 2 * _workers(ray)))
    owner = group_lists(probes, nlist, parts)
    copies = owners_per_row(probes, owner)
    wanted = max(1, min(nlist, _task_count(ray, nbytes * copies, LIST_TASK_BYTES)))
    if wanted > parts:  # more data than 2 tasks per CPU hold: more, smaller tasks (each row a few more copies)
        owner = group_lists(probes, nlist, wanted)
        copies = owners_per_row(probes, owner)
    return owner, copies


# ---------------------------------------------------------------------------- Ray task bodies
def _warm_task() -> float:
    """Ray task: import what the geometry tasks use (torch, FAISS, the lake reader); seconds it took."""
    t0 = time.perf_counter()
    import torch  # noqa: F401  (the heaviest import: seconds per fresh worker process)

    from m2m.geometry import kappa  # noqa: F401
    from m2m.index.runtime import require_faiss
    from m2m.lake import neighbourhood  # noqa: F401

    require_faiss()
    return time.perf_counter() - t0


def _warm(ray: Any) -> list[Any]:
    """One `_warm_task` per CPU of the cluster, started before the driver's sampling and k-means so that
    fresh workers load their modules while the driver works, not when the first stage needs them."""
    task = ray.remote(num_cpus=1, max_retries=0)(_warm_task)
    return [task.remote() for _ in range(_workers(ray))]


def _exact_sample_task(fs: LakeFS, manifest: Manifest, verify: bool, lo: int, hi: int, queries: np.ndarray,
                       kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``kk`` of ``queries`` over shards ``[lo, hi)``: (scores, global positions)."""
    return _exact_over(Snapshot(fs, manifest, verify=verify), lo, hi, queries, kk)


def _exact_over(snap: Snapshot, lo: int, hi: int, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """``_exact_sample_task`` on an open snapshot (-inf / -1 where the shards hold fewer than kk rows)."""
    from m2m.index.exact import exact_knn_of
    from m2m.index.runtime import compute_threads

    mu = _range_mu(snap, lo, hi)
    off = int(snap.shard_offsets[lo])
    with compute_threads(1) as faiss:
        d, i = exact_knn_of(faiss, mu, queries, min(kk, mu.shape[0]))
    if d.shape[1] < kk:  # fewer rows than kk in this range
        pad = kk - d.shape[1]
        d = np.concatenate([d, np.full((d.shape[0], pad), -np.inf, np.float32)], axis=1)
        i = np.concatenate([i, np.full((i.shape[0], pad), -1, np.int64)], axis=1)
    return d, np.where(i >= 0, i + off, -1)


def _route_task(fs: LakeFS, manifest: Manifest, verify: bool, lo: int, hi: int, centroids: np.ndarray,
                nprobe: int, max_gap: float, penalty: np.ndarray | None, owner: np.ndarray,
                with_labels: bool) -> Any:
    """Rows of shards ``[lo, hi)`` for each owner task: those whose home list or a probed list it owns,
    each once, with their probes (`m2m.index.kmeans.probe_lists`, the local engine's rule)."""
    from m2m.index.kmeans import probe_lists
    from m2m.index.runtime import compute_threads, resolve_precision
    from m2m.ray.owners import probe_owners

    snap = Snapshot(fs, manifest, verify=verify)
    mu = _range_mu(snap, lo, hi)
    off = int(snap.shard_offsets[lo])
    precision = resolve_precision("auto", mu.shape[1])
    centroids = np.array(centroids)  # writable (Ray hands out read-only arrays; torch wraps them)
    with compute_threads(1) as faiss:
        probes = probe_lists(faiss, mu, centroids, nprobe, precision, max_gap, penalty)
    labels = np.concatenate([snap.column(s, "label") for s in range(lo, hi)]) if with_labels else None
    parts = int(owner.max()) + 1 if owner.size else 1
    who = probe_owners(probes, owner)
    probes = probes.astype(np.int32 if centroids.shape[0] < 2**31 else np.int64)
    outs = []
    for p in range(parts):
        rows = np.flatnonzero((who == p).any(axis=1))
        outs.append({"pos": rows + off, "vec": mu[rows], "probes": probes[rows],
                     "label": None if labels is None else labels[rows].astype(np.int64)})
    return _one_or_many(outs)


def _routed(parts: tuple[dict[str, Any], ...], nlist: int, owned: np.ndarray) -> tuple[dict[str, Any], Any]:
    """The rows routed to one owner task (each once) and their `Partition` over the lists it ``owned``
    (members: every row, by home list; visitors: recorded for the owned lists only)."""
    from m2m.index.kmeans import partition_of

    rows: dict[str, Any] = {k: np.concatenate([p[k] for p in parts]) for k in ("pos", "vec", "probes")}
    rows["label"] = (np.concatenate([p["label"] for p in parts])
                     if parts and parts[0]["label"] is not None else None)
    visited = np.zeros(nlist, bool)
    visited[owned] = True
    return rows, partition_of(rows["probes"].astype(np.int64), nlist, visited)


def _knn_lists_task(k: int, nlist: int, owned: np.ndarray, range_starts: np.ndarray, *parts: dict[str, Any]) -> Any:
    """Per-row top-``k`` candidates from the lists this task owns (the local engine's list search,
    `m2m.index.knn.list_search`), split by shard range."""
    from m2m.index.knn import list_search
    from m2m.index.runtime import compute_threads, resolve_precision

    rows, part = _routed(parts, nlist, owned)
    vec = rows["vec"]
    if vec.shape[0]:
        precision = resolve_precision("auto", vec.shape[1])
        with compute_threads(1) as faiss:
            score, idx = list_search(faiss, vec, part, k, True, precision, lists=owned)
        found = idx[:, 0] >= 0
        pos = rows["pos"][found]
        nbr = np.where(idx[found] >= 0, rows["pos"][np.maximum(idx[found], 0)], -1)
        score = score[found].astype(np.float32)
    else:
        pos, nbr, score = np.zeros(0, np.int64), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    where = np.searchsorted(range_starts, pos, side="right") - 1
    outs = []
    for j in range(range_starts.size):
        sel = where == j
        outs.append({"pos": pos[sel], "nbr": nbr[sel], "score": score[sel]})
    return _one_or_many(outs)


def _best_k(n_rows: int, off: int, k: int, parts: tuple[dict[str, Any], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best candidates over the list tasks: (global neighbour positions, scores), descending.

    The list search reaches each pair once per row across all tasks (`m2m.index.knn`'s rule, whichever
    task owns the lists), so the candidates merge in one heap, no pair repeated."""
    from m2m.index.runtime import require_faiss

    heap = require_faiss().ResultHeap(n_rows, k, keep_max=True)
    for p in parts:
        if p["pos"].size and p["nbr"].shape[1]:
            heap.add_result_subset(np.ascontiguousarray(p["pos"] - off, np.int64),
                                   np.ascontiguousarray(p["score"], np.float32),
                                   np.ascontiguousarray(p["nbr"], np.int64))
    heap.finalize()
    nbr = heap.I
    return nbr, np.where(nbr >= 0, heap.D, np.float32(0.0)).astype(np.float32)


def _kappa_task(fs: LakeFS, manifest: Manifest, verify: bool, lo: int, hi: int, k: int, k_eff: int,
                range_starts: np.ndarray, *parts: dict[str, Any]) -> tuple[Any, ...]:
    """Finish, stage 1: merge the candidates of shards ``[lo, hi)`` and estimate their kappa.

    Returns ``(rows, own, request_0, ..., request_R-1)``, one object each: ``rows``, what `_write_task`
    needs of the range (``ids`` of its rows then of its neighbours living elsewhere, ``local`` neighbour
    positions into those, ``cos``); ``own``, the range's ``kappa`` (final: user kappa where given),
    ``alpha`` and ``label`` codes, the terms other ranges' rows need of it; ``request_j``, the sorted
    global positions of this range's neighbours that live in range ``j`` (none for itself)."""
    from m2m.geometry.kappa import neighbourhood_kappa
    from m2m.index.rows import renormalise_
    from m2m.index.runtime import compute_threads
    from m2m.lake.neighbourhood import final_kappa

    snap = Snapshot(fs, manifest, verify=verify)
    off = int(snap.shard_offsets[lo])
    n_rows = int(snap.shard_offsets[hi]) - off
    shards = range(lo, hi)
    nbr, cos = _best_k(n_rows, off, k_eff, parts)
    _refill_short_rows(snap, off, nbr, cos)
    if k_eff < k:
        nbr = np.concatenate([nbr, np.full((n_rows, k - k_eff), -1, np.int64)], axis=1)
        cos = np.concatenate([cos, np.zeros((n_rows, k - k_eff), np.float32)], axis=1)
    outside = np.unique(nbr[(nbr >= 0) & ((nbr < off) | (nbr >= off + n_rows))])
    # rows of the range first, then the neighbours living elsewhere: neighbour indices into that
    mu = np.empty((n_rows + outside.size, manifest.dim), np.float32)  # one array, no concatenated copies
    at, half = 0, False
    for s in shards:
        col = snap.column(s, "mu")
        mu[at:at + col.shape[0]] = col
        at += col.shape[0]
        half = half or col.dtype == np.float16
    snap.gather("mu", outside, out=mu[n_rows:])
    if half:   # float16 rows renormalised, as the local engine and the list search read them
        renormalise_(mu)
    inside = (nbr >= off) & (nbr < off + n_rows)
    local = np.where(inside, nbr - off, n_rows + np.searchsorted(outside, nbr))
    local = np.where(nbr >= 0, local, -1)
    with compute_threads(1):
        kappa_est = neighbourhood_kappa(mu, local, rows=n_rows).astype(np.float32)
    del mu  # the vectors are done with: not held while the rest is read
    ids = np.concatenate([np.concatenate([snap.column(s, "id") for s in shards]), snap.gather("id", outside)])
    # the columns the local engine reads (`m2m.lake.neighbourhood.estimate`): kappa and alpha of the main
    # files (a sidecar's kappa is an earlier estimate), label codes as the stream reads them
    user = np.concatenate([_main_column(snap, s, "kappa") for s in shards])
    own = {"kappa": final_kappa(user, kappa_est),
           "alpha": np.concatenate([_main_column(snap, s, "alpha") for s in shards]),
           "label": (np.concatenate([snap.column(s, "label") for s in shards])
                     if manifest.label_type is not None else None)}
    # `outside` is sorted: the positions each other range holds are one slice of it
    cuts = np.searchsorted(outside, np.append(range_starts, manifest.rows))
    requests = [outside[a:b] for a, b in pairwise(cuts)]
    return ({"ids": ids, "local": local, "cos": cos}, own, *requests)


def _refill_short_rows(snap: Snapshot, off: int, nbr: np.ndarray, cos: np.ndarray) -> None:
    """Search exactly, over every shard (read one at a time), the rows of a range the list search left
    with fewer than k neighbours, in place (the local engine's `m2m.index.knn.refill_short_rows`: a
    row alone in its list that no other row's probes visit finds nobody, and would get NaN kappa)."""
    from m2m.index.exact import drop_self
    from m2m.index.runtime import require_faiss

    k = nbr.shape[1]
    short = np.flatnonzero((nbr < 0).any(axis=1)) if k else np.zeros(0, np.int64)
    if short.size == 0:
        return
    pos = short + off
    queries = _sample_mu(snap, pos)
    heap = require_faiss().ResultHeap(pos.size, k + 1, keep_max=True)
    for s in range(len(snap.manifest.shards)):
        d, i = _exact_over(snap, s, s + 1, queries, k + 1)
        heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(i, np.int64))
    heap.finalize()
    score, idx = drop_self(heap.D, heap.I, pos, k)
    nbr[short] = idx
    cos[short] = np.where(idx >= 0, score, np.float32(0.0))
    logger.info("ray kNN: %d rows from row %d searched exactly (the lists left them short)", short.size, off)


def _terms_task(off: int, own: dict[str, Any], *requests: np.ndarray) -> Any:
    """Finish, between the stages: what each range requested of this range's ``own`` terms (one return
    per range, in range order); ``off`` is this range's first global position."""
    outs = []
    for req in requests:
        at = req - off
        outs.append({name: None if values is None else values[at] for name, values in own.items()})
    return _one_or_many(outs)


def _write_task(fs: LakeFS, manifest: Manifest, lo: int, hi: int, rows: dict[str, Any], own: dict[str, Any],
                *answers: dict[str, Any]) -> dict[str, Any]:
    """Finish, stage 2: the geometry sidecars of shards ``[lo, hi)`` with their neighbour terms.

    ``answers`` are the terms of the range's outside neighbours, one per range in range order: together
    the rows after the range's own in ``rows["ids"]``, as `_kappa_task` numbered them."""
    from m2m.lake.neighbourhood import neighbour_terms, write_geometry

    def joined(name: str) -> np.ndarray:
        return np.concatenate([own[name], *[a[name] for a in answers]])

    local = rows["local"]
    kappa, alpha = joined("kappa"), joined("alpha")
    labels = None if own["label"] is None else joined("label")
    if kappa.size != rows["ids"].size:  # the answers do not line up with the neighbours numbered
        raise InternalError(f"shards [{lo}, {hi}): {kappa.size} neighbour terms for {rows['ids'].size} rows")
    terms = neighbour_terms(local, kappa, alpha, labels)
    with removed_on_failure(fs, "a failed geometry task"):
        fields = write_geometry(fs, manifest, manifest.shards[lo:hi], rows["ids"], own["kappa"], local, rows["cos"],
                                terms)
    return {"shards": fields["shards"], "stats": fields["stats"]}


def _main_column(snap: Snapshot, shard: int, name: str) -> np.ndarray:
    """Column ``name`` of a shard's main file (as ``Snapshot.read_main``, for one shard)."""
    return snap.read_main(name, shards=[shard])


def _duplicates_task(thr: float, nlist: int, owned: np.ndarray, *parts: dict[str, Any]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Edges (cos >= thr, equal labels) found in this task's lists, reduced to a spanning forest."""
    from m2m.consolidation.groups import connected_components, threshold_hits
    from m2m.index.runtime import compute_threads

    rows, part = _routed(parts, nlist, owned)
    us: list[np.ndarray] = []
    vs: list[np.ndarray] = []
    codes = rows["label"]
    with compute_threads(1):
        for lst in owned:
            members, visitors = part.members(int(lst)), part.visitors(int(lst))
            m = members.size
            if m == 0:
                continue
            at = np.concatenate([members, visitors])
            pos = rows["pos"][at]
            vec = np.ascontiguousarray(rows["vec"][at])
            lab = None if codes is None else codes[at]
            base = vec[:m]
            for start in range(0, m, MEMBER_CHUNK):  # members vs members, on and above the diagonal
                stop = min(m, start + MEMBER_CHUNK)
                ii, jj = np.nonzero(threshold_hits(base[start:stop], base[start:], thr))
                ii, jj = ii + start, jj + start
                keep = ii != jj
                if lab is not None:
                    keep &= lab[ii] == lab[jj]
                us.append(pos[ii[keep]])
                vs.append(pos[jj[keep]])
            for start in range(m, vec.shape[0], MEMBER_CHUNK):  # visitors vs members
                stop = min(vec.shape[0], start + MEMBER_CHUNK)
                ii, jj = np.nonzero(threshold_hits(vec[start:stop], base, thr))
                ii = ii + start
                keep = np.ones(ii.size, bool) if lab is None else lab[ii] == lab[jj]
                us.append(pos[ii[keep]])
                vs.append(pos[jj[keep]])
    u = np.concatenate(us) if us else np.zeros(0, np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
    if u.size == 0:
        return u, v
    nodes, inv = np.unique(np.concatenate([u, v]), return_inverse=True)
    comp = connected_components(nodes.size, inv[:u.size], inv[u.size:])
    first = np.zeros(int(comp.max()) + 1, np.int64)
    first[comp[::-1]] = np.arange(nodes.size)[::-1]  # each component's smallest node
    tree = first[comp] != np.arange(nodes.size)
    return nodes[tree], nodes[first[comp][tree]]


# ---------------------------------------------------------------------------- driver side
def _sample_mu(snap: Snapshot, positions: np.ndarray) -> np.ndarray:
    from m2m.index.rows import rows_f32

    return rows_f32(snap.gather("mu", positions), slice(None))


def _exact_neighbours(ray: Any, snap: Snapshot, ranges: list[tuple[int, int]], rows: np.ndarray,
                      kk: int, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``kk`` (scores, positions) of lake rows ``rows`` over the whole lake, by Ray tasks."""
    from m2m.index.runtime import require_faiss

    faiss = require_faiss()
    queries = _sample_mu(snap, rows)
    task = ray.remote(num_cpus=1, max_retries=0)(_exact_sample_task)
    q_ref = ray.put(queries)
    results = gather(ray, [task.remote(snap.fs, snap.manifest, verify, lo, hi, q_ref, kk) for lo, hi in ranges])
    heap = faiss.ResultHeap(rows.size, kk, keep_max=True)
    for d, i in results:
        heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(i, np.int64))
    heap.finalize()
    return heap.D, heap.I


def _compact(snap: Snapshot, rows: np.ndarray, nbr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of a sample and their neighbours as a small array, with positions into it."""
    uniq = np.unique(np.concatenate([rows, nbr[nbr >= 0]]))
    mu = _sample_mu(snap, uniq)
    return mu, np.searchsorted(uniq, rows), np.where(nbr >= 0, np.searchsorted(uniq, np.maximum(nbr, 0)), -1)


def _route(ray: Any, snap: Snapshot, ranges: list[tuple[int, int]], centroids: np.ndarray, nprobe: int,
           max_gap: float, penalty: np.ndarray | None, owner: np.ndarray, with_labels: bool, verify: bool
           ) -> list[list[Any]]:
    parts = int(owner.max()) + 1
    task = ray.remote(num_cpus=1, max_retries=0)(_route_task)
    c_ref, o_ref = ray.put(centroids), ray.put(owner)
    return [_as_list(task.options(num_returns=parts).remote(snap.fs, snap.manifest, verify, lo, hi, c_ref, nprobe,
                                                            max_gap, penalty, o_ref, with_labels), parts)
            for lo, hi in ranges]


def _finish(ray: Any, snap: Snapshot, ranges: list[tuple[int, int]], range_starts: np.ndarray,
            candidates: list[list[Any]], k: int, k_eff: int) -> list[Any]:
    """Refs of the `_write_task` of every range, after its `_kappa_task` and the `_terms_task` of the
    ranges its rows' neighbours live in. A range's neighbours' kappa is known only once their own range
    has estimated it, so the terms are shuffled by position through the object store (each range
    receives the terms of its outside neighbours alone, not the other ranges' whole columns)."""
    fs, base, verify = snap.fs, snap.manifest, snap.verify
    r = len(ranges)
    kappa_task = ray.remote(num_cpus=1, max_retries=0)(_kappa_task)
    terms_task = ray.remote(num_cpus=1, max_retries=0)(_terms_task)
    write_task = ray.remote(num_cpus=1, max_retries=0)(_write_task)
    first = [kappa_task.options(num_returns=2 + r).remote(fs, base, verify, lo, hi, k, k_eff, range_starts,
                                                          *[c[j] for c in candidates])
             for j, (lo, hi) in enumerate(ranges)]
    answers = [_as_list(terms_task.options(num_returns=r).remote(int(range_starts[j]), first[j][1],
                                                                 *[f[2 + j] for f in first]), r)
               for j in range(r)]
    return [write_task.remote(fs, base, lo, hi, first[j][0], first[j][1], *[a[j] for a in answers])
            for j, (lo, hi) in enumerate(ranges)]


def geometry_fields(snap: Snapshot, k: int, seed: int, progress: Progress = None,
                    target_recall: float = 0.95, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Manifest fields (``shards`` with new geometry sidecars, ``stats``, ``geometry``) of ``snap``'s
    version with kappa and neighbours estimated by Ray tasks (the local engine's method and rule)."""
    from m2m.index.calibration import CALIBRATION_ROWS, calibrate_probes, size_penalty
    from m2m.index.exact import drop_self
    from m2m.index.kmeans import default_nlist, gap_probes, train_centroids
    from m2m.index.knn import (
        KMEANS_ITERATIONS,
        LISTS_PER_SQRT_ROWS,
        SIZE_SAMPLE_PER_LIST,
        SIZE_SLOPES,
    )
    from m2m.index.runtime import compute_threads, resolve_precision
    from m2m.lake.neighbourhood import ESTIMATOR

    ray = require_ray()
    t0 = time.perf_counter()
    warm = _warm(ray)
    base, verify = snap.manifest, snap.verify
    n, d = base.rows, base.dim
    k_eff = max(0, min(k, n - 1))
    row_bytes = 4.0 * d
    ranges = shard_ranges(base, _task_count(ray, n * row_bytes))
    rng = np.random.default_rng(seed)
    nlist = default_nlist(n, LISTS_PER_SQRT_ROWS)
    n_train = min(n, nlist * 20)
    train_rows = np.arange(n) if n_train == n else np.sort(rng.choice(n, size=n_train, replace=False))
    with compute_threads(None) as faiss:
        centroids = train_centroids(_sample_mu(snap, train_rows), nlist, niter=KMEANS_ITERATIONS, seed=seed,
                                    max_points_per_centroid=20)
        size_rows = np.sort(rng.choice(n, size=min(n, SIZE_SAMPLE_PER_LIST * nlist), replace=False))
        precision = resolve_precision("auto", d)
        size_mu = _sample_mu(snap, size_rows)
        homes = gap_probes(size_mu, centroids, 1, precision, float("inf"))[:, 0]
        sizes = np.bincount(homes, minlength=nlist) * (n / size_rows.size)
        cal_rows = np.sort(rng.choice(n, size=min(n, CALIBRATION_ROWS), replace=False))
        kk = min(n, k_eff + 1)
        t1 = time.perf_counter()
        scores, nbr = _exact_neighbours(ray, snap, ranges, cal_rows, kk, verify)
        _, nbr = drop_self(scores, nbr, cal_rows, k_eff)
        mu_c, rows_c, nbr_c = _compact(snap, cal_rows, nbr)
        nprobe, max_gap, recall, slope = calibrate_probes(
            faiss, mu_c, centroids, k_eff, min(1.0, target_recall + 0.01), rng, True, sizes=sizes,
            slopes=SIZE_SLOPES, neighbours=(rows_c, nbr_c))
        penalty = size_penalty(sizes, slope) if slope else None
        nprobe = int(min(max(nprobe, 1), nlist))
        owner, copies = _owners(faiss, ray, size_mu, centroids, nprobe, precision, max_gap, penalty, n * row_bytes)
    t2 = time.perf_counter()
    routed = _route(ray, snap, ranges, centroids, nprobe, max_gap, penalty, owner, False, verify)
    finish = shard_ranges(base, _finish_ranges(n, k_eff, row_bytes, _workers(ray)))
    range_starts = np.array([int(snap.shard_offsets[lo]) for lo, _ in finish], np.int64)
    lists_task = ray.remote(num_cpus=1, max_retries=0)(_knn_lists_task)
    candidates = [_as_list(lists_task.options(num_returns=len(finish)).remote(
        k_eff, nlist, np.flatnonzero(owner == p), range_starts, *[r[p] for r in routed]), len(finish))
        for p in range(int(owner.max()) + 1)]
    results = gather(ray, _finish(ray, snap, finish, range_starts, candidates, k, k_eff))
    t3 = time.perf_counter()
    loads = gather(ray, warm)
    shards: list[ShardEntry] = []
    summary: dict[str, Any] = {}
    for res in results:
        shards += list(res["shards"])
        summary = lake_stats.merge(summary, res["stats"])
    alpha_stats = base.stats.get("alpha") if base.stats else None
    if alpha_stats is not None:
        summary["alpha"] = alpha_stats
    if progress is not None:
        progress(n)
    logger.info("ray kNN + kappa of %d rows: nlist=%d nprobe=%d max_gap=%.4f (calibrated recall@%d %.3f), "
                "%d tasks/stage; %.1f s (driver %.1f s)", n, nlist, nprobe, max_gap, k_eff, recall,
                len(ranges), t3 - t0, (t1 - t0))
    if stats is not None:
        stats.update(nlist=nlist, nprobe=nprobe, max_gap=max_gap, calibrated_recall=recall, ranges=len(ranges), finish_ranges=len(finish),
                     owners=int(owner.max()) + 1, copies_per_row=copies, seconds={"sample": t1 - t0, "calibrate": t2 - t1,
                                                           "search": t3 - t2, "worker_imports": max(loads)})
    # the run stamp `write_geometry` put in every sidecar (the version the tasks read): a stale sidecar is refused
    return {"shards": tuple(shards), "stats": summary,
            "geometry": {"k": int(k), "estimator": ESTIMATOR, "rows": int(n), "estimated_at": time.time(),
                         "stamp": str(base.version)}}


def estimate(snap: Snapshot, k: int, seed: int, progress: Progress = None) -> Manifest:
    """The next manifest with kappa and neighbours estimated by Ray tasks (``snap`` is closed when done)."""
    from m2m.lake.neighbourhood import estimate as local_estimate

    base = snap.manifest
    if base.rows < 2 or base.rows <= LOCAL_MAX_ROWS:  # nothing to distribute / exact locally, and sooner
        logger.info("estimate_kappa(engine='ray') of %d rows <= %d: the local engine's exact search runs in the "
                    "driver", base.rows, LOCAL_MAX_ROWS)
        new = local_estimate(snap, k, seed)
        return dataclasses.replace(new, operation={**new.operation, "engine": "local (ray: small lake)"})
    try:
        fields = geometry_fields(snap, k, seed, progress)
    finally:
        snap.close()
    new = base.next(operation={"type": "estimate_kappa", "k": k, "engine": "ray"}, **fields)
    adopt_new_files(snap.fs, base, new)  # the tasks' sidecars, as the commit's own (checked, removed if not published)
    return new


def duplicate_groups(snap: Snapshot, similarity: float, seed: int, target_recall: float = 0.99,
                     stats: dict[str, Any] | None = None) -> np.ndarray:
    """Group id ``int64 [N]`` of every row (as `m2m.consolidation.groups.find_duplicate_groups`), by Ray tasks."""
    from m2m.consolidation.groups import (
        calibrate_pair_probes,
        connected_components,
        similarity_threshold,
    )
    from m2m.index.exact import drop_self
    from m2m.index.kmeans import default_nlist, train_centroids
    from m2m.index.runtime import compute_threads, resolve_precision

    ray = require_ray()
    base, verify = snap.manifest, snap.verify
    n = base.rows
    if n == 0:
        return np.zeros(0, np.int64)
    warm = _warm(ray)
    thr = similarity_threshold(similarity)
    row_bytes = 4.0 * base.dim
    ranges = shard_ranges(base, _task_count(ray, n * row_bytes))
    rng = np.random.default_rng(seed)
    nlist = min(n, default_nlist(n))
    n_train = min(n, nlist * 24)
    train_rows = np.arange(n) if n_train == n else np.sort(rng.choice(n, size=n_train, replace=False))
    with compute_threads(None) as faiss:
        centroids = train_centroids(_sample_mu(snap, train_rows), nlist, niter=10, seed=seed,
                                    max_points_per_centroid=24)
        cal_rows = np.sort(rng.choice(n, size=min(n, 512), replace=False))
        scores, nbr = _exact_neighbours(ray, snap, ranges, cal_rows, min(n, 2), verify)
        scores, nbr = drop_self(scores, nbr, cal_rows, 1)
        mu_c, rows_c, nbr_c = _compact(snap, cal_rows, nbr[:, :1])
        nprobe, recall = calibrate_pair_probes(faiss, mu_c, centroids, thr, target_recall, rng,
                                               nearest=(rows_c, scores[:, 0], nbr_c[:, 0]))
        nprobe = int(min(max(nprobe, 2), nlist))
        plan_rows = np.sort(rng.choice(n, size=min(n, PLAN_SAMPLE_PER_LIST * nlist), replace=False))
        owner, copies = _owners(faiss, ray, _sample_mu(snap, plan_rows), centroids, nprobe,
                                resolve_precision("auto", base.dim), float("inf"), None, n * row_bytes)
    with_labels = base.label_type is not None
    routed = _route(ray, snap, ranges, centroids, nprobe, float("inf"), None, owner, with_labels, verify)
    task = ray.remote(num_cpus=1, max_retries=0)(_duplicates_task)
    edges = gather(ray, [task.remote(thr, nlist, np.flatnonzero(owner == p), *[r[p] for r in routed])
                          for p in range(int(owner.max()) + 1)])
    gather(ray, warm)
    u = np.concatenate([e[0] for e in edges])
    v = np.concatenate([e[1] for e in edges])
    logger.info("ray duplicates of %d rows: nlist=%d nprobe=%d (calibrated pair recall %.3f), %d forest edges",
                n, nlist, nprobe, recall, u.size)
    if stats is not None:
        stats.update(nlist=nlist, nprobe=nprobe, calibrated_recall=recall, owners=int(owner.max()) + 1,
                     copies_per_row=copies)
    return connected_components(n, u, v)
