"""Calibration of the IVF probe rule: which lists a row must probe to reach a target recall."""

from __future__ import annotations

from typing import Any

import numpy as np

from m2m.index.exact import drop_self, exact_knn_of, rescored_knn_of
from m2m.index.rows import rows_f32
from m2m.index.runtime import resolve_precision

#: Rows of the sample whose exact neighbours calibrate the probe rule (its recall estimate
#: scatters by about 0.003; docs/tuning.md).
CALIBRATION_ROWS = 1024


def size_penalty(sizes: np.ndarray, slope: float) -> np.ndarray:
    """``float32 [nlist]``: ``slope * log2(size / median size)``, the score a list's centroid loses for probing."""
    sizes = np.asarray(sizes, np.float64) + 0.5
    return (slope * np.log2(sizes / np.median(sizes))).astype(np.float32)


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
    sizes: np.ndarray | None = None,
    slopes: tuple[float, ...] = (0.0,),
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
    probe_cap: int | None = None,
) -> tuple[int, float, float, float]:
    """The probe rule reaching ``target_recall`` (symmetric recall@k) on a random row sample.

    A row probes, besides its home list, the lists whose penalised centroid score (score minus
    ``size_penalty(sizes, slope)``) is within ``max_gap`` of its home centroid's score, at most
    ``nprobe - 1`` of them (the best by penalised score). A true neighbour j of row i is found
    iff j's home list is probed by i or i's home list by j, so the recall of every rule follows
    from centroid scores of the sample and its exact neighbours; for every slope in ``slopes``
    the smallest ``max_gap`` reaching the target is found (``nprobe`` starts at ``max_probes``
    and doubles if that cap is too tight), and the slope whose sample rows probe the fewest
    member rows (by ``sizes``, estimated list sizes) wins: a positive slope makes large lists,
    which cost more to probe, harder to reach. Returns ``(nprobe, max_gap, recall_on_sample,
    slope)``. ``probe_cap`` bounds ``nprobe`` (the cost) even where the target is then not reached
    (on data without cluster structure every list may be needed); the returned recall says what
    the capped rule reaches on the sample.

    ``neighbours``: ``(rows, nbr)``, the sample rows and their exact neighbours (positions into
    ``mu``, self excluded, -1 where missing), computed elsewhere (e.g. by Ray tasks over a lake
    too large for one machine; then ``mu`` need only hold those rows); the sample search is skipped.
    """
    n = mu.shape[0]
    nlist = centroids.shape[0]
    if neighbours is None:
        rows = np.sort(rng.choice(n, size=min(n, sample), replace=False))
        q = rows_f32(mu, rows)
        kk = min(n, k + 1 if exclude_self else k)
        search = rescored_knn_of if resolve_precision("auto", mu.shape[1]) == "bfloat16" else exact_knn_of
        scores, nbr = search(faiss, mu, q, kk)
        if exclude_self:
            _, nbr = drop_self(scores, nbr, rows, min(k, kk))
    else:
        rows, nbr = neighbours
        q = rows_f32(mu, rows)
    valid = nbr >= 0
    no_penalty = np.zeros(nlist, np.float32)
    if not valid.any():
        return 1, float("inf"), 1.0, 0.0
    if sizes is None:
        slopes = (0.0,)
    qi = np.nonzero(valid)[0]
    nb = nbr[valid]
    idx = np.arange(nb.size)
    cq = q @ centroids.T                    # [s, nlist]
    cn = rows_f32(mu, nb) @ centroids.T     # [pairs, nlist]
    home_q, home_n = cq.argmax(axis=1), cn.argmax(axis=1)
    top_q, top_n = cq.max(axis=1), cn.max(axis=1)
    same = home_q[qi] == home_n
    best_rule: tuple[float, int, float, float, float] | None = None
    for slope in slopes:
        pen = size_penalty(sizes, slope) if slope and sizes is not None else no_penalty
        aq, an = cq - pen, cn - pen             # penalised scores
        to_n = aq[qi, home_n]                   # for row i, of neighbour j's home list
        to_q = an[idx, home_q[qi]]              # for j, of i's home list
        # rank among the lists other than the row's home
        rank_q = (aq[qi] > to_n[:, None]).sum(axis=1) - (aq[qi, home_q[qi]] > to_n)
        rank_n = (an > to_q[:, None]).sum(axis=1) - (an[idx, home_n] > to_q)
        gap_q = top_q[qi] - to_n
        gap_n = top_n - to_q
        cap = nlist if probe_cap is None else max(1, min(nlist, probe_cap))
        m = min(max_probes, cap)
        while True:
            best = np.minimum(np.where(rank_q < m - 1, gap_q, np.inf), np.where(rank_n < m - 1, gap_n, np.inf))
            best[same] = 0.0
            if np.isfinite(best).mean() >= target_recall or m >= cap:
                break
            m = min(cap, 2 * m)
        best = np.sort(best)
        cut = best[min(best.size, int(np.ceil(target_recall * best.size))) - 1]
        max_gap = float(cut) if np.isfinite(cut) else float("inf")
        recall = float(((best <= max_gap) & np.isfinite(best)).mean())  # pairs out of reach are missed
        cost = 0.0
        if sizes is not None and len(slopes) > 1:
            others = aq.copy()
            others[np.arange(aq.shape[0]), home_q] = -np.inf
            order = np.argsort(-others, axis=1, kind="stable")[:, :m - 1]
            probed = (top_q[:, None] - np.take_along_axis(others, order, axis=1)) <= max_gap
            cost = float((np.asarray(sizes, np.float64)[order] * probed).sum(axis=1).mean())
        if best_rule is None or cost < best_rule[0]:
            best_rule = (cost, m, max_gap, recall, float(slope))
    assert best_rule is not None  # the loop above runs at least once
    _, m, max_gap, recall, slope = best_rule
    return m, max_gap, recall, slope

