"""Consolidation as a lake commit: merge near-duplicate splats into heavier splats in a new version.

Groups come from `m2m.consolidation.groups.find_duplicate_groups` (cosine >= similarity, same label).
A group of one keeps its row untouched. A larger group becomes one splat that keeps the smallest id of
its members (so ids stay ascending and stable for every row that was not merged), with
``mu`` = normalised alpha-weighted mean, ``alpha`` = sum of the members' alphas, the label of its
members and the metadata of its first member; kappa and neighbours are then re-estimated for the
whole new version from its kNN neighbourhoods.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from m2m._validate import SplatBatch
from m2m.config import M2MConfig
from m2m.consolidation.groups import ConsolidationReport, find_duplicate_groups, merge_groups
from m2m.lake import summary as lake_stats
from m2m.lake.integrity import WriteStamp
from m2m.lake.manifest import Manifest
from m2m.lake.neighbourhood import compute_geometry, with_geometry
from m2m.lake.reader import Snapshot
from m2m.lake.writer import SchemaUpdate, write_splats
from m2m.plugins import implementation


def consolidate_manifest(snap: Snapshot, similarity: float, config: M2MConfig,
                         progress: Callable[[int], None] | None = None,
                         engine: str = "local") -> tuple[Manifest, ConsolidationReport]:
    """The next manifest after merging the near-duplicates of ``snap``'s version, and the report
    (``snap`` is closed when done). ``engine="ray"``: the duplicate search and the new version's kNN
    run as Ray tasks (`m2m.ray.geometry`); reading, merging and writing the merged rows run here."""
    from m2m.index.rows import rows_f32

    t0 = time.perf_counter()
    fs, base = snap.fs, snap.manifest
    alpha_before = float(base.stats.get("alpha", {}).get("sum", 0.0)) if base.stats else 0.0
    if base.rows == 0:
        snap.close()
        report = ConsolidationReport(0, 0, 0, 0.0, 0.0, 0.0)
        return base.next(operation={"type": "consolidate", "similarity": similarity}), report
    try:
        mu = rows_f32(snap.read_all("mu"), slice(None))   # float16 rows renormalised, as the kNN reads them
        ids = snap.ids()
        alpha = snap.read_main("alpha")
        codes = snap.read_all("label") if base.label_type is not None else None
        raw_labels = snap.read_main("label") if base.label_type is not None else None
        user_kappa = snap.read_main("kappa")
        norms = snap.norms()
        metadata = {name: snap.read_main(name) for name in base.metadata}
        if engine == "ray":
            group = implementation("ray.duplicate_groups")(snap, similarity, config.seed)
        else:
            group = find_duplicate_groups(mu, codes, similarity, seed=config.seed, progress=progress)
        merged = merge_groups(group, mu, alpha, user_kappa)   # groups of one keep their row bit for bit
    finally:
        snap.close()
    rep = merged["representative"]            # first (smallest) position of each group, ascending
    size = merged["size"]
    g = len(rep)
    new_mu, new_alpha, new_kappa = merged["mu"], merged["alpha"], merged["kappa"]
    batch = SplatBatch(vectors=new_mu, labels=None if raw_labels is None else raw_labels[rep], kappa=new_kappa,
                       alpha=new_alpha, metadata={k: v[rep] for k, v in metadata.items()}, ids=ids[rep],
                       norms=norms[rep])  # a merged splat keeps its first member's norm, like its metadata
    schema = SchemaUpdate.of(base)
    stamp = WriteStamp(base.lake_id, prev_id=-1)  # all shards are new, in id order; next_id stays
    shards = tuple(write_splats(fs, [batch], 0, base.dim, base.dtype, config.shard_bytes, schema, stamp=stamp))
    # a lake left this small: the local exact search, as estimate_kappa(engine="ray") does
    if engine == "ray" and g > implementation("ray.local_max_rows")():
        geometry_fields = implementation("ray.geometry_fields")
        merged_version = base.next(shards=shards)  # not committed: the Ray tasks read its shard files
        fields = geometry_fields(Snapshot(fs, merged_version, verify=snap.verify), config.knn_k, config.seed)
    else:
        # the rows as stored, renormalised as estimate_kappa reads them: a float16 lake's geometry from the
        # float32 means was off its rows (neighbour cosines by 4e-4, kappa by up to 18% against an
        # estimate_kappa right after: observed)
        stored_mu = rows_f32(new_mu.astype(np.float16), slice(None)) if base.dtype == "float16" else new_mu
        kappa_est, nbrs, cos = compute_geometry(stored_mu, config.knn_k, config.seed)
        fields = with_geometry(fs, base, shards, ids[rep], new_kappa, kappa_est, nbrs, cos, new_alpha,
                               None if codes is None else codes[rep])
    fields["stats"]["alpha"] = lake_stats.summarize(new_kappa, new_alpha)["alpha"]
    alpha_after = float(new_alpha.sum(dtype=np.float64))
    report = ConsolidationReport(rows_before=base.rows, rows_after=g, groups_merged=int((size > 1).sum()),
                                 alpha_before=alpha_before, alpha_after=alpha_after,
                                 seconds=time.perf_counter() - t0)
    new = base.next(operation={"type": "consolidate", "similarity": similarity, "rows_before": base.rows,
                               "rows_after": g}, **fields)
    return new, report
