"""Which list-owner task scores which IVF lists (a pure plan, from a sample of rows' probes).

The routed search ships every row to each task that owns its home list or a list it probes, once per
task. Lists dealt out by size alone put a row's few probed lists in as many different tasks, so the
shuffle carries each row about once per probed list; grouping lists that rows probe *together*
(neighbouring centroids) into one task ships a row fewer times. The grouping also balances the tasks'
work: a list costs about its members times (its members + its visitors) scored pairs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["group_lists", "owners_per_row", "probe_owners"]


def _costs(probes: np.ndarray, nlist: int) -> np.ndarray:
    """Relative scoring cost of every list from a row sample's probes: members x (members + visitors)."""
    home = probes[:, 0]
    visits = probes[:, 1:]
    members = np.bincount(home, minlength=nlist).astype(np.float64)
    visitors = np.bincount(visits[visits >= 0], minlength=nlist).astype(np.float64)
    return members * (members + visitors) + 1.0  # + 1: an empty list still costs its task a little


#: Probe pairs counted at once (a chunk of sample rows holds rows x width^2 of them).
PAIR_CHUNK = 1 << 22


def _co_probes(probes: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, neighbour list, count) of how many sample rows probe each pair of lists together."""
    w = probes.shape[1]
    keys: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    step = max(1, PAIR_CHUNK // max(1, w * w))
    for start in range(0, probes.shape[0], step):  # memory: the distinct pairs, not every pair at once
        p = probes[start:start + step]
        a = np.repeat(p, w, axis=1).ravel()
        b = np.tile(p, (1, w)).ravel()
        ok = (a >= 0) & (b >= 0) & (a != b)
        k, c = np.unique(a[ok] * nlist + b[ok], return_counts=True)
        keys.append(k)
        counts.append(c)
    key, inv = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_inverse=True)
    count = np.bincount(inv, weights=np.concatenate(counts) if counts else None, minlength=key.size)
    src, dst = np.divmod(key, nlist)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=nlist))])
    return indptr, dst, count.astype(np.float64)


def group_lists(probes: np.ndarray, nlist: int, parts: int) -> np.ndarray:
    """Owner task ``int64 [nlist]`` (``0 .. parts-1``) of every list, from a row sample's ``probes``.

    ``probes``: ``[S, p]`` home list then probed lists of each sampled row (``-1`` pads), by the rule
    the search routes with. Each task but the last is grown from the most costly list not yet dealt,
    adding the free list most often probed together with the task's lists (the most costly free list
    when none is), until it holds its share of the total cost; the last task takes what is left.
    Deterministic: a pure function of its arguments.
    """
    parts = max(1, min(int(parts), nlist))
    owner = np.full(nlist, -1, np.int64)
    if parts == 1:
        owner[:] = 0
        return owner
    probes = np.asarray(probes, np.int64)
    cost = _costs(probes, nlist)
    indptr, nbr, count = _co_probes(probes, nlist)
    target = cost.sum() / parts
    free = np.ones(nlist, bool)
    for p in range(parts - 1):
        if not free.any():
            break
        affinity = np.zeros(nlist)
        load = 0.0
        lst = int(np.argmax(np.where(free, cost, -1.0)))
        while True:
            owner[lst] = p
            free[lst] = False
            load += cost[lst]
            affinity[nbr[indptr[lst]:indptr[lst + 1]]] += count[indptr[lst]:indptr[lst + 1]]
            if load >= target or not free.any():
                break
            near = np.where(free, affinity, -1.0)
            lst = int(np.argmax(near))
            if near[lst] <= 0.0:  # no free list is probed with this task's: the most costly free one
                lst = int(np.argmax(np.where(free, cost, -1.0)))
            if load + cost[lst] / 2 > target:  # adding it would overshoot by more than half of it
                break
    owner[free] = parts - 1
    return owner


def probe_owners(probes: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """The owner task of each of ``probes``' lists (``-1`` where ``probes`` pads): a row goes to each."""
    return np.where(probes >= 0, owner[np.maximum(probes, 0)], -1)


def owners_per_row(probes: np.ndarray, owner: np.ndarray) -> float:
    """Mean number of distinct owner tasks a row is shipped to (the shuffle's copies of each row)."""
    own = probe_owners(probes, owner)
    own.sort(axis=1)
    distinct = (own[:, :1] >= 0).astype(np.int64).ravel() + ((own[:, 1:] != own[:, :-1]) & (own[:, 1:] >= 0)).sum(1)
    return float(distinct.mean()) if distinct.size else 0.0
