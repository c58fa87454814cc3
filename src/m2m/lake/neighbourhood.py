"""Per-splat geometry of a snapshot: kNN neighbour ids and kappa, written as sidecar files per shard.

Shards are immutable, so (re)estimating kappa never rewrites the vectors: each shard gets a small
sidecar Arrow file with ``id`` (the shard's ids again, which binds the sidecar to its shard: they are
checked against the shard's id range), ``kappa`` (float32), ``neighbors`` (fixed_size_list<int64>[k]
of neighbour *ids*, -1 where missing) and ``neighbor_cos`` (fixed_size_list<float32>[k], their
cosines), and the new manifest lists it after the shard's main file (later files win).
A user-provided kappa (not NaN in the main file) is kept; only missing values take the estimate.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from m2m.lake import summary as lake_stats
from m2m.lake.fs import LakeFS
from m2m.lake.manifest import Manifest, ShardEntry
from m2m.lake.reader import Snapshot
from m2m.lake.shard import write_shard_file

logger = logging.getLogger(__name__)

ESTIMATOR = "vMF MLE of the splat and its k nearest neighbours, Bessel-corrected (m2m.geometry.kappa)"


def compute_geometry(mu: np.ndarray, k: int, seed: int = 0, progress: Callable[[int], None] | None = None,
                     threads: int | None = None, probe_budget: int | None = None,
                     stats: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kappa estimate [N], neighbour positions [N, k] int64, neighbour cosines [N, k]) for unit rows.

    ``threads``: FAISS/torch threads of the kNN and the estimator (None: ``DEFAULT_THREADS``);
    ``probe_budget`` and ``stats``: passed to `m2m.index.knn.knn`.
    """
    from m2m.geometry.kappa import neighbourhood_kappa
    from m2m.index.knn import knn
    from m2m.index.runtime import compute_threads

    n = len(mu)
    k_eff = max(0, min(k, n - 1))
    if k_eff == 0:
        return np.full(n, np.nan, np.float32), np.full((n, k), -1, np.int64), np.zeros((n, k), np.float32)
    scores, idx = knn(mu, k_eff, seed=seed, progress=progress, threads=threads, probe_budget=probe_budget,
                      stats=stats)
    if k_eff < k:
        idx = np.concatenate([idx, np.full((n, k - k_eff), -1, np.int64)], axis=1)
        scores = np.concatenate([scores, np.zeros((n, k - k_eff), np.float32)], axis=1)
    scores = np.where(idx >= 0, scores, 0.0).astype(np.float32)
    with compute_threads(threads):
        kappa = neighbourhood_kappa(mu, idx)
    return kappa.astype(np.float32), idx.astype(np.int64), scores


def final_kappa(user_kappa: np.ndarray, kappa_est: np.ndarray) -> np.ndarray:
    """The kappa a sidecar stores: the user's where given (not NaN), the estimate elsewhere (float32)."""
    return np.where(np.isnan(user_kappa), kappa_est, user_kappa).astype(np.float32)


def with_geometry(fs: LakeFS, base: Manifest, shards: Sequence[ShardEntry], ids: np.ndarray,
                  user_kappa: np.ndarray, kappa_est: np.ndarray, neighbors: np.ndarray,
                  neighbor_cos: np.ndarray, alpha: np.ndarray | None = None,
                  labels: np.ndarray | None = None) -> dict[str, Any]:
    """Write one sidecar per shard and return the manifest fields of the estimated snapshot.

    ``neighbors`` are positions in the rows of ``shards`` (all of them). With ``alpha`` (those rows'
    masses; and ``labels``, their label codes, on a lake with labels) each sidecar also carries its
    rows' neighbour terms (``neighbor_kappa``, ``neighbor_alpha``, ``neighbor_same_label``), which let
    a process build a row's augmentation terms from its own shard (`m2m.augment.tables`). The Ray
    engine, whose tasks see a range of shards, gathers its neighbours' terms from the other ranges and
    writes the same columns through `write_geometry`.
    """
    kappa = final_kappa(user_kappa, kappa_est)
    terms = None if alpha is None else neighbour_terms(neighbors, kappa, alpha, labels)
    return write_geometry(fs, base, shards, ids, kappa, neighbors, neighbor_cos, terms)


def write_geometry(fs: LakeFS, base: Manifest, shards: Sequence[ShardEntry], ids: np.ndarray,
                   kappa: np.ndarray, neighbors: np.ndarray, neighbor_cos: np.ndarray,
                   terms: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """`with_geometry` given the final ``kappa`` of the rows of ``shards`` and their neighbour ``terms``
    (`neighbour_terms`, or None to write none). ``neighbors`` are positions in ``ids``: the rows of
    ``shards`` first, then any neighbours that live in other shards (a Ray task's range)."""
    from m2m.lake.integrity import STAMP_GEOMETRY, STAMP_LAKE

    # every sidecar of one run carries the run's stamp, and so does the manifest's geometry: a
    # sidecar of another run (a stale one) is refused when it is opened
    run = str(base.version)
    stamp = {STAMP_GEOMETRY: run} | ({STAMP_LAKE: base.lake_id} if base.lake_id else {})
    nbr_ids = np.where(neighbors >= 0, ids[np.maximum(neighbors, 0)], -1).astype(np.int64)
    new_shards = []
    lo = 0
    for shard in shards:
        hi = lo + shard.rows
        # the sidecar repeats the shard's ids so it is bound to its shard (checked against id_min/id_max)
        columns = {"id": ids[lo:hi], "kappa": kappa[lo:hi], "neighbors": nbr_ids[lo:hi],
                   "neighbor_cos": neighbor_cos[lo:hi]}
        if terms is not None:
            columns.update({name: values[lo:hi] for name, values in terms.items()})
        side = write_shard_file(fs, columns, stamp)
        keep = tuple(f for f in shard.files if "neighbors" not in f.columns)
        new_shards.append(ShardEntry(shard.rows, shard.id_min, shard.id_max, keep + (side,)))
        lo = hi
    alpha_stats = base.stats.get("alpha") if base.stats else None
    stats = lake_stats.summarize(kappa, np.zeros(0, np.float32))
    if alpha_stats is not None:
        stats["alpha"] = alpha_stats
    return {"shards": tuple(new_shards), "stats": stats,
            "geometry": {"k": int(neighbors.shape[1]), "estimator": ESTIMATOR, "rows": int(lo),
                         "estimated_at": time.time(), "stamp": run}}


def neighbour_terms(neighbors: np.ndarray, kappa: np.ndarray, alpha: np.ndarray,
                    labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each row's neighbours' kappa and alpha (NaN and 0 where there is no neighbour) and, with
    ``labels``, whether each neighbour has the row's label: the columns `with_geometry` adds.

    ``neighbors`` ``[n, k]`` are positions in ``kappa``/``alpha``/``labels``, whose first ``n`` entries
    are the rows themselves (more may follow: neighbours living elsewhere, as in a Ray task)."""
    have = neighbors >= 0
    nb = np.maximum(neighbors, 0)
    out = {"neighbor_kappa": np.where(have, kappa[nb], np.float32(np.nan)).astype(np.float32),
           "neighbor_alpha": np.where(have, alpha[nb], np.float32(0.0)).astype(np.float32)}
    if labels is not None:
        out["neighbor_same_label"] = have & (labels[nb] == labels[:len(neighbors), None])
    return out


def estimate(snap: Snapshot, k: int, seed: int,
             progress: Callable[[int], None] | None = None, threads: int | None = None) -> Manifest:
    """The next manifest: ``snap``'s version with kappa and neighbours estimated for every splat
    (``snap`` is closed when done)."""
    from m2m.index.rows import rows_f32

    fs, base = snap.fs, snap.manifest
    try:
        mu = rows_f32(snap.read_all("mu"), slice(None))   # float16 rows renormalised, as the kNN reads them
        ids = snap.ids()
        user = snap.read_main("kappa")
        alpha = snap.read_main("alpha")
        labels = snap.read_all("label") if base.label_type is not None else None
        t0 = time.perf_counter()
        kappa_est, nbrs, cos = compute_geometry(mu, k, seed, progress, threads)
        logger.info("kNN + kappa for %d splats in %.1f s", len(mu), time.perf_counter() - t0)
        fields = with_geometry(fs, base, base.shards, ids, user, kappa_est, nbrs, cos, alpha, labels)
    finally:
        snap.close()
    return base.next(operation={"type": "estimate_kappa", "k": k}, **fields)


def needs_geometry(manifest: Manifest, k: int) -> bool:
    """True when some splat has no estimated kappa/neighbours at neighbourhood size ``k``."""
    if manifest.rows == 0:
        return False
    g = manifest.geometry
    if g is None or int(g.get("k", -1)) != k:
        return True
    return any(not any("neighbors" in f.columns for f in s.files) for s in manifest.shards)


def has_terms(manifest: Manifest, k: int) -> bool:
    """True when every shard's geometry sidecar carries the neighbour terms at neighbourhood size ``k``
    and every row has a kappa estimate (`SnapshotTerms` can then serve every shard)."""
    g = manifest.geometry
    if manifest.rows == 0 or g is None or int(g.get("k", -1)) != k:
        return False
    count = ((manifest.stats or {}).get("kappa") or {}).get("count")
    if count != manifest.rows:       # a NaN kappa takes the lake-wide median: whole-lake arrays
        return False
    need = {"neighbors", "neighbor_kappa", "neighbor_alpha"}
    if manifest.label_type is not None:
        need.add("neighbor_same_label")
    return all(any(need <= set(f.columns) for f in s.files) for s in manifest.shards)


class SnapshotTerms:
    """`m2m.augment.tables.SplatTerms` read from a snapshot's shards and geometry sidecars, one shard
    at a time (nothing kept here: the augmenter keeps what it derives)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    @property
    def shard_offsets(self) -> np.ndarray:
        return self.snap.shard_offsets

    @property
    def k(self) -> int:
        return int((self.snap.manifest.geometry or {}).get("k", 0))

    def kappa(self, shard: int) -> np.ndarray:
        return self.snap.column(shard, "kappa")

    def terms(self, shard: int) -> Any:
        from m2m.augment.tables import ShardTerms

        snap = self.snap
        same = snap.column(shard, "neighbor_same_label") if snap.manifest.label_type is not None else None
        return ShardTerms(kappa=snap.column(shard, "kappa"), alpha=snap.column(shard, "alpha"),
                          neighbors=snap.neighbor_positions(shard),
                          neighbor_cos=snap.column(shard, "neighbor_cos"),
                          neighbor_kappa=snap.column(shard, "neighbor_kappa"),
                          neighbor_alpha=snap.column(shard, "neighbor_alpha"), same_label=same)
