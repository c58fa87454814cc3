"""A lake snapshot's importance scores and alpha, read one shard at a time, for `ShardedImportance`.

`m2m.sampling.samplers.ImportanceSampler` holds the whole lake's alpha and scores (16 B a row) and
draws the whole epoch (12 B a draw) in every process: 28 GB per rank at 1B rows. From
`m2m.stream.order.RANK_LOCAL_ROWS` rows on, `export_to_dataloader(importance_sampling=...)` builds a
`ShardedImportance` over `ShardValues` instead: the same scores ("kappa", "alpha" or a numeric
column), read shard by shard when the sampler needs them, and with shard affinity each rank draws
only its own shards' rows ("loss": a `ShardedLoss`, whose priorities are in memory).

The "kappa" scores need two lake-wide medians (the fill of splats without an estimate and the kappa
floor, `m2m.sampling.samplers.kappa_fill` and `kappa_floor`). Reading every shard for them would be a third
pass over the lake, so they are taken from a deterministic sample of whole shards spread evenly over
the lake (at least `SAMPLE_ROWS` rows, every shard when the lake is smaller): every rank computes
the same values, and on a lake that small they are the whole-lake medians.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from m2m.errors import ConfigError
from m2m.sampling.samplers import kappa_fill, kappa_floor
from m2m.sampling.sharded import ShardedImportance, ShardedLoss

if TYPE_CHECKING:  # pragma: no cover
    from m2m.lake.reader import Snapshot

__all__ = ["SAMPLE_ROWS", "ShardValues", "kappa_medians", "sharded_importance"]

#: rows of the shard sample the "kappa" mode's medians are taken from (4 MB of float32 kappa)
SAMPLE_ROWS = 1 << 20


class ShardValues:
    """``values_of(shard)`` for `ShardedImportance`: one shard's ``what`` ("alpha", "kappa" scores =
    1 / kappa filled and floored, or a numeric metadata column) read from ``snap``. Picklable (a
    snapshot pickles), so a loader with spawned workers carries it."""

    def __init__(self, snap: "Snapshot", what: str, fill: float = math.nan, low: float = 0.0) -> None:
        self.snap, self.what, self.fill, self.low = snap, what, float(fill), float(low)

    def __call__(self, shard: int) -> np.ndarray:
        values = self.snap.column(shard, self.what)
        if self.what == "kappa":
            k = values.astype(np.float64)
            k = np.where(np.isnan(k), self.fill, k)
            return 1.0 / np.maximum(k, self.low)
        if not np.issubdtype(values.dtype, np.number) or values.dtype.kind == "b":
            raise ConfigError(f"importance_sampling column {self.what!r} is not numeric (dtype {values.dtype})")
        return values


def sample_shards(shard_offsets: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Indices of whole shards spread evenly over the lake holding at least ``rows`` (default
    `SAMPLE_ROWS`) rows, all shards when the lake has fewer: a function of the shard sizes only."""
    rows = SAMPLE_ROWS if rows is None else int(rows)
    sizes = np.diff(np.asarray(shard_offsets, dtype=np.int64))
    if len(sizes) == 0 or int(sizes.sum()) <= rows:
        return np.arange(len(sizes), dtype=np.int64)
    count = min(len(sizes), max(1, -(-rows * len(sizes) // int(sizes.sum()))))
    while True:
        picked = np.unique(np.linspace(0, len(sizes) - 1, count).round().astype(np.int64))
        if int(sizes[picked].sum()) >= rows or count >= len(sizes):
            return picked
        count = min(len(sizes), count * 2)


def kappa_medians(snap: "Snapshot", dim: int, rows: int | None = None) -> tuple[float, float]:
    """``(fill, low)`` of the "kappa" scores (`m2m.sampling.samplers.kappa_fill`, then `kappa_floor` of
    the filled values), as the whole-lake sampler computes them over every row, here over
    `sample_shards`."""
    picked = sample_shards(snap.shard_offsets, rows).tolist()
    kappa = (np.concatenate([snap.column(s, "kappa").astype(np.float32) for s in picked]) if picked
             else np.zeros(0, np.float32))
    fill = kappa_fill(kappa, dim)
    return fill, kappa_floor(np.where(np.isnan(kappa), np.float32(fill), kappa))


def sharded_importance(snap: "Snapshot", mode: str, seed: int, dim: int) -> ShardedImportance:
    """A `ShardedImportance` of ``mode`` ("kappa", "alpha" or a numeric metadata column) over ``snap``,
    reading its scores and alpha shard by shard (module doc); for "loss", a `ShardedLoss` (priorities
    in memory, alpha by shard, ids mapped through the snapshot)."""
    if mode == "loss":
        from m2m.sampling.priorities import IdPositions

        return ShardedLoss(snap.shard_offsets, ShardValues(snap, "alpha"), ids=IdPositions(snap), seed=seed)
    fill, low = kappa_medians(snap, dim) if mode == "kappa" else (math.nan, 0.0)
    return ShardedImportance(snap.shard_offsets, ShardValues(snap, mode, fill, low), ShardValues(snap, "alpha"),
                             seed=seed)
