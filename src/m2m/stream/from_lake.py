"""Wire a lake snapshot, the SOC sampler and the augmenter into a stream (`Lake.export_to_dataloader`).

The lake package does not import this module: `m2m._wiring` registers `export_to_dataloader` as the
implementation of ``"stream.export"`` (`m2m.plugins`), which `Lake.export_to_dataloader` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from m2m.augment.tables import DEFAULT_TERMS_BYTES
from m2m.errors import ConfigError
from m2m.sampling.importance import BUILTIN_MODES
from m2m.stream.loader import StreamLoader, make_loader
from m2m.stream.options import GENERATE_MODES, StreamOptions, generate_mode

if TYPE_CHECKING:  # pragma: no cover
    from m2m.lake.lake import Lake
    from m2m.lake.reader import Snapshot

logger = logging.getLogger(__name__)

__all__ = ["GENERATE_MODES", "LakeParts", "export_to_dataloader", "generate_mode", "importance_mode", "lake_identity",
           "lake_parts"]


def importance_mode(importance_sampling: Any, metadata: Sequence[str]) -> str | None:
    """False -> None, True -> "kappa", "kappa"/"alpha"/"loss"/a numeric metadata column as is."""
    if importance_sampling is False or importance_sampling is None:
        return None
    if importance_sampling is True:
        return "kappa"
    if isinstance(importance_sampling, str) and (importance_sampling in BUILTIN_MODES
                                                 or importance_sampling in metadata):
        if importance_sampling == "loss" and "loss" in metadata:
            # (the mode wins: a probing user expected the column and got uniform priorities, silently)
            logger.warning("importance_sampling='loss' is the loss-feedback mode (update_priorities); this lake also "
                           "has a metadata column 'loss', which it does not sample by: copy it under another name "
                           "to sample by its values")
        return importance_sampling
    raise ConfigError(f"importance_sampling must be False, True, 'kappa', 'alpha', 'loss' or a metadata column "
                      f"({list(metadata)}), got {importance_sampling!r}")


@dataclass(frozen=True)
class Geometry:
    """kappa (NaN where no estimate), neighbour row positions [N, k] (-1 missing) and their cosines;
    ``key``: how geometry computed in memory was made (``"k=16,seed=0"``), None for stored geometry."""

    kappa: np.ndarray
    neighbors: np.ndarray
    neighbor_cos: np.ndarray
    key: str | None = None


def stored_geometry(snap: "Snapshot") -> Geometry:
    """The geometry a snapshot stores (after ``lake.estimate_kappa``)."""
    return Geometry(snap.read_all("kappa"), snap.read_all("neighbors"), snap.read_all("neighbor_cos"))


#: IVF lists each row probes at most when a stream computes missing geometry in memory. A stream
#: must start quickly: on data with cluster structure the calibrated rule probes fewer lists than
#: this anyway, and on unstructured data (random vectors) reaching the recall target means probing
#: every list, an N^2 scan (docs/tuning.md). Kappa of such data barely depends on which
#: near neighbours are found; the recall reached is logged. ``lake.estimate_kappa()`` has no cap.
STREAM_PROBE_BUDGET = 16


def computed_geometry(snap: "Snapshot", k: int, seed: int) -> Geometry:
    """kNN + kappa of ``snap`` computed in memory, never written: a stream does not change the lake.

    User-provided kappa values are kept, as `Lake.estimate_kappa` does. The kNN probes at most
    `STREAM_PROBE_BUDGET` IVF lists per row (exact up to 20k rows). Shows a progress bar when
    stderr is a terminal; logs one INFO line saying how to persist the result.
    """
    from m2m.index.rows import rows_f32
    from m2m.index.runtime import usable_cores
    from m2m.lake.neighbourhood import compute_geometry

    t0 = time.perf_counter()
    stored = snap.read_all("mu")
    half = stored.dtype == np.float16
    mu = rows_f32(stored, slice(None))   # float16 rows renormalised, as estimate_kappa reads them
    del stored   # (a float16 lake's rows are not held beside their float32 copy)
    with progress_bar(len(mu), "kappa (in memory)") as bar:
        stats: dict[str, Any] = {}
        kappa_est, neighbors, cos = compute_geometry(mu, k, seed, bar, usable_cores(),
                                                     probe_budget=STREAM_PROBE_BUDGET, stats=stats)
    user = snap.read_main("kappa")
    kappa = np.where(np.isnan(user), kappa_est, user).astype(np.float32)
    recall = stats.get("calibrated_recall", float("nan"))
    found = "exact" if stats.get("method") == "exact" else f"recall@{k} about {recall:.2f}"
    logger.info("lake version %d has no kappa/neighbours at knn_k=%d: computed them in memory for this loader "
                "(%d splats, %.1f s, neighbours %s); call lake.estimate_kappa() once to persist them and skip "
                "this step", snap.version, k, len(mu), time.perf_counter() - t0, found)
    # a stream state records the key: another k (another handle's knn_k) or, for the IVF search above
    # 20k rows, another seed gives other kappa, hence another kappa-importance plan and other draws;
    # float16 rows are marked: renormalised since 2026-12-07, their geometry differs from older states'
    key = f"k={k}" + ("" if stats.get("method") == "exact" else f",seed={seed}")
    key += ",float16 renormalised" if half else ""
    return Geometry(kappa, neighbors, cos, key)


class GeometryOverlay:
    """A `FileBackedSource`: ``snap`` with in-memory kappa/neighbours in place of the stored ones, so the
    batches' ``kappa``/``neighbors``/``neighbor_cos`` columns are those the sampler and augmenter use."""

    OVERLAID = ("kappa", "neighbors", "neighbor_cos")

    def __init__(self, snap: "Snapshot", geometry: Geometry) -> None:
        self.snap = snap
        self.geometry = geometry

    @property
    def geometry_key(self) -> str | None:
        """How the in-memory geometry was made (`Geometry.key`; kept in stream states)."""
        return self.geometry.key

    @property
    def snapshot_key(self) -> str:
        return self.snap.snapshot_key

    num_rows = property(lambda self: self.snap.num_rows)
    dim = property(lambda self: self.snap.dim)
    storage_dtype = property(lambda self: self.snap.storage_dtype)
    shard_offsets = property(lambda self: self.snap.shard_offsets)
    fs = property(lambda self: self.snap.fs)
    is_remote = property(lambda self: self.snap.is_remote)
    open_bytes_limit = property(lambda self: self.snap.open_bytes_limit)

    def plan_prefetch(self, shards: Sequence[int]) -> None:
        self.snap.plan_prefetch(shards)

    def prefetch_shards(self, shards: Sequence[int]) -> int:
        return self.snap.prefetch_shards(shards)

    def fetch_stats(self) -> dict[str, Any] | None:
        return self.snap.fetch_stats()

    @property
    def column_names(self) -> Sequence[str]:
        return tuple(dict.fromkeys([*self.snap.column_names, *self.OVERLAID]))

    def column(self, shard: int, name: str) -> np.ndarray:
        if name in self.OVERLAID:
            offsets = self.snap.shard_offsets
            return getattr(self.geometry, name)[offsets[shard]:offsets[shard + 1]]
        return self.snap.column(shard, name)

    def column_sample(self, name: str) -> np.ndarray | None:
        if name in self.OVERLAID:
            return getattr(self.geometry, name)[:0]
        return self.snap.column_sample(name)

    def column_extent(self, shard: int, name: str) -> Any:
        """Where a stored column lies on disk (positional reads); None for the in-memory columns."""
        if name in self.OVERLAID:
            return None
        return self.snap.column_extent(shard, name)

    def __getattr__(self, name: str) -> Any:  # the rest of the snapshot (version, manifest, ...)
        if name.startswith("__") or name in ("snap", "geometry"):
            raise AttributeError(name)
        return getattr(self.snap, name)


@contextlib.contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr used as a progress callback, shown only when stderr is a terminal."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="rows", unit_scale=True, disable=None, file=sys.stderr, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


def sharded_sampling(snap: "Snapshot", mode: str | None, k: int) -> bool:
    """Whether importance ``mode`` over ``snap`` draws its plan shard by shard (`m2m.sampling.lake_scores`):
    from `m2m.stream.order.RANK_LOCAL_ROWS` rows on (where the uniform orders are rank-local too), for
    every mode; "kappa" only when every shard has its geometry (else the whole-lake sampler over kappa
    computed in memory, as below that size)."""
    from m2m.lake.neighbourhood import needs_geometry
    from m2m.stream.order import rank_local

    if mode is None or not rank_local(snap.num_rows):
        return False
    return mode != "kappa" or not needs_geometry(snap.manifest, k)


def build_sampler(lake: "Lake", mode: str, seed: int, snap: "Snapshot | None" = None,
                  geometry: Geometry | None = None, sharded: bool | None = None) -> Any:
    """The importance sampler of ``mode`` over ``snap`` (default: the lake's current snapshot): a
    `ShardedImportance` (`ShardedLoss` for "loss") reading the lake shard by shard when
    `sharded_sampling` (``sharded``: that decision made already), else the whole-lake
    `ImportanceSampler` (or `LossSampler`)."""
    from m2m.sampling.samplers import ImportanceSampler, LossSampler

    snap = lake.snapshot if snap is None else snap
    if sharded is None:
        sharded = sharded_sampling(snap, mode, stream_k(snap.manifest, lake.config.knn_k))
    if geometry is None and sharded:
        from m2m.sampling.lake_scores import sharded_importance
        from m2m.sampling.samplers import LossFeedback

        built = sharded_importance(snap, mode, seed, lake.dim)
        if isinstance(built, LossFeedback):
            built.rows_key = rows_key(snap.manifest)
        return built
    alpha = snap.read_all("alpha").astype(np.float64)
    if mode == "loss":
        from m2m.sampling.priorities import IdPositions

        loss = LossSampler(alpha, ids=IdPositions(snap), seed=seed)
        loss.rows_key = rows_key(snap.manifest)
        return loss
    if mode in ("kappa", "alpha"):
        column = None
    else:
        column = snap.read_all(mode)
        if not np.issubdtype(column.dtype, np.number):
            raise ConfigError(f"importance_sampling column {mode!r} is not numeric (dtype {column.dtype})")
    kappa = None
    if mode == "kappa":
        kappa = filled_kappa(snap.read_all("kappa") if geometry is None else geometry.kappa, lake.dim)
    return ImportanceSampler(mode=mode, alpha=alpha, kappa=kappa, column=column, seed=seed)


def rows_key(manifest: Any) -> str:
    """What names a version's rows, hashed: runs of consecutive ids (shards holding every id of their
    range) and, for shards with gaps (consolidated), their main file (immutable: a fixed set of rows)
    and row count. Equal across versions that add sidecars (estimate_kappa) or compact appended shards;
    another key after a consolidate that merged rows, a rollback and append, or an append. A loss
    sampler's state keeps it (per-row priorities)."""
    h = hashlib.sha256()
    run: list[int] | None = None  # [first, last] id of the current run of whole ranges

    def close() -> None:
        if run is not None:
            h.update(f"ids {run[0]}-{run[1]}\n".encode())

    for shard in manifest.shards:
        if shard.rows == 0:
            continue
        whole = shard.rows == shard.id_max - shard.id_min + 1
        if whole and run is not None and shard.id_min == run[1] + 1:
            run[1] = shard.id_max
            continue
        close()
        run = [shard.id_min, shard.id_max] if whole else None
        if not whole:
            h.update(f"file {shard.files[0].path} {shard.rows}\n".encode())
    close()
    return h.hexdigest()[:32]


def filled_kappa(kappa: np.ndarray, dim: int) -> np.ndarray:
    """kappa with NaN (splats with no valid neighbour) replaced by the median estimate (or ``dim``)."""
    from m2m.sampling.samplers import kappa_fill

    missing = np.isnan(kappa)
    if not missing.any():
        return kappa
    fill = kappa_fill(kappa, dim)
    logger.info("%d splats have no kappa estimate; using %.4g for them", int(missing.sum()), fill)
    return np.where(missing, np.float32(fill), kappa).astype(np.float32)


#: whole-lake augmentation tables above this many bytes are built shard by shard instead
#: (`m2m.augment.tables`, kept within `TERMS_CACHE_BYTES`), when the lake's sidecars carry the
#: neighbour terms and the stream is not a full shuffle
TERMS_BYTES = 1 << 30
TERMS_CACHE_BYTES = DEFAULT_TERMS_BYTES


def whole_table_bytes(mode: str, rows: int, k: int) -> int:
    """About the bytes an augmenter over whole-lake arrays holds for ``rows`` splats (its tables)."""
    if mode == "vmf":
        return rows * 8
    if mode == "mixture":
        return rows * (8 + 12 * (k + 1))
    return rows * (48 + 16 * k)      # packed, kappa, log weights, neighbours, path constants


def by_shard_terms(snap: "Snapshot", mode: str, k: int) -> Any:
    """`SnapshotTerms` of ``snap`` when ``mode``'s augmenter should read its terms by shard (whole-lake
    tables above `TERMS_BYTES` and sidecars that carry the terms), else None."""
    from m2m.lake.neighbourhood import SnapshotTerms, has_terms

    if whole_table_bytes(mode, snap.num_rows, k) <= TERMS_BYTES or not has_terms(snap.manifest, k):
        return None
    return SnapshotTerms(snap)


def build_augmenter(lake: "Lake", mode: str, snap: "Snapshot | None" = None,
                    geometry: Geometry | None = None, terms: Any = None) -> Any:
    """`_augmenter`, told whether the lake's rows are unit vectors in float32 (a float16 lake's are not:
    its draws normalise their means first, so augmented rows are unit to float32 precision)."""
    aug = _augmenter(lake, mode, snap, geometry, terms)
    aug.unit_means = (lake.snapshot if snap is None else snap).manifest.dtype == "float32"
    return aug


def _augmenter(lake: "Lake", mode: str, snap: "Snapshot | None" = None,
               geometry: Geometry | None = None, terms: Any = None) -> Any:
    """The Langevin, vMF or mixture augmenter over ``snap`` (default: the lake's current snapshot, whose
    kappa must be estimated unless ``geometry`` is given). Over whole-lake arrays, or reading its terms
    shard by shard from ``terms`` (`by_shard_terms`, for a stream that is not a full shuffle: a full
    shuffle would rebuild every shard's tables for every batch)."""
    cfg = lake.config
    snap = lake.snapshot if snap is None else snap
    if terms is not None:
        from m2m.augment.augmenter import LangevinAugmenter, MixtureAugmenter, VMFAugmenter

        logger.info("%s augmentation reads its terms shard by shard (whole-lake tables would hold ~%.1f GB)",
                    mode, whole_table_bytes(mode, snap.num_rows, cfg.knn_k) / 1e9)
        if mode == "vmf":
            return VMFAugmenter.by_shard(terms, terms_bytes=TERMS_CACHE_BYTES)
        if mode == "mixture":
            return MixtureAugmenter.by_shard(terms, temperature=cfg.langevin_T, terms_bytes=TERMS_CACHE_BYTES)
        return LangevinAugmenter.by_shard(terms, steps=cfg.langevin_steps, step_size=cfg.langevin_dt,
                                          temperature=cfg.langevin_T, terms_bytes=TERMS_CACHE_BYTES)
    kappa_raw = snap.read_all("kappa") if geometry is None else geometry.kappa
    kappa = filled_kappa(kappa_raw.astype(np.float32), lake.dim)
    if mode == "vmf":
        from m2m.augment.augmenter import VMFAugmenter

        return VMFAugmenter(kappa)
    from m2m.augment.augmenter import LangevinAugmenter

    geo = stored_geometry(snap) if geometry is None else geometry
    labels = snap.read_all("label") if snap.manifest.label_type is not None else None
    if mode == "mixture":
        from m2m.augment.augmenter import MixtureAugmenter

        return MixtureAugmenter(neighbors=geo.neighbors, kappa=kappa,
                                alpha=snap.read_all("alpha").astype(np.float32), labels=labels,
                                temperature=cfg.langevin_T)
    return LangevinAugmenter(neighbors=geo.neighbors, kappa=kappa,
                             alpha=snap.read_all("alpha").astype(np.float32), labels=labels,
                             steps=cfg.langevin_steps, step_size=cfg.langevin_dt, temperature=cfg.langevin_T,
                             neighbor_cos=geo.neighbor_cos)


def lake_identity(lake: "Lake") -> str:
    """A stable name of ``lake`` kept in stream states: the manifest's lake id when it has one, else a
    digest of the lake's location (a state from another lake is then refused)."""
    lake_id = getattr(lake.manifest, "lake_id", None)
    if lake_id:
        return str(lake_id)
    where = str(lake.path).rstrip("/")
    return "path:" + hashlib.sha256(where.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LakeParts:
    """What a stream over one lake's pinned snapshot needs: the row source (the snapshot, or it with
    in-memory geometry), the importance sampler and the augmenter (None when off), and its identity."""

    source: Any
    sampler: Any
    augment: Any
    identity: str
    version: int


def stream_k(manifest: Any, k: int) -> int:
    """The neighbourhood size a stream works at: the stored geometry's when every shard has it, else
    ``k`` (``config.knn_k``). A lake estimated at another k than its handle's config (create_m2m or
    open_lake(knn_k=...) over an existing lake) streamed the stored kappa for vMF and a plain kappa
    column but recomputed geometry in memory for the mixture and Langevin modes (observed: another
    kappa, other vMF draws and another kappa-importance plan depending on the mode): one k for every
    mode, the one on disk (`Lake.estimate_kappa` re-estimates it at ``knn_k``)."""
    from m2m.lake.neighbourhood import needs_geometry

    stored = (manifest.geometry or {}).get("k")
    if isinstance(stored, int) and stored >= 1 and not needs_geometry(manifest, stored):
        return stored
    return k


#: Columns of a lake's geometry: a stream asked for one the pinned snapshot lacks computes it in memory
GEOMETRY_COLUMNS = ("kappa", "neighbors", "neighbor_cos")


def lake_parts(lake: "Lake", gen: str | None, imp: str | None, seed: int, shard_local: bool = False,
               columns: Sequence[str] | None = None) -> LakeParts:
    """The `LakeParts` of ``lake`` for generation mode ``gen`` and importance mode ``imp`` (both
    resolved); ``shard_local``: the stream is not a full shuffle (`build_augmenter`); ``columns``: the
    delivered columns. Never writes to the lake: geometry a mode or a delivered geometry column needs
    and the pinned snapshot lacks is computed in memory (no commit, no lock), so a column's values do
    not depend on the modes."""
    from m2m.lake.neighbourhood import needs_geometry

    cfg = lake.config
    snap = lake.snapshot  # pinned: the sampler, the augmenter and the stream all read this version
    k = stream_k(snap.manifest, cfg.knn_k)
    if snap.num_rows == 0:
        raise ConfigError(f"lake {lake.path} is empty: add splats before exporting a stream")
    # only modes that use kappa look, and they look at the data, not at the manifest's
    # stats.kappa.count: a wrong count must not skip the estimate (a remote lake's shards are not
    # downloaded here for modes that never read kappa)
    # a sharded sampler (and an augmenter reading its terms by shard) fills and checks kappa shard by shard
    sharded = sharded_sampling(snap, imp, k)   # (walks every shard's files: decided once)
    whole_kappa = imp == "kappa" and not sharded
    uses_kappa = gen == "vmf" or whole_kappa
    terms = by_shard_terms(snap, gen, k) if shard_local and gen is not None and not whole_kappa else None
    nan_kappa = functools.cache(lambda: bool(np.isnan(snap.read_all("kappa")).any()))  # (read at most once)
    kappa_missing = uses_kappa and terms is None and nan_kappa()
    wants_kappa = gen in ("langevin", "mixture") or kappa_missing
    asked = set(columns or ()) & set(GEOMETRY_COLUMNS)
    if asked - {"kappa"} or ("kappa" in asked and nan_kappa()):
        wants_kappa = True  # (the stream would deliver NaN kappa, or no neighbours, for rows lacking them)
    geometry = None
    if wants_kappa and needs_geometry(snap.manifest, k):  # Langevin/mixture also need the neighbour table
        geometry = computed_geometry(snap, k, cfg.seed)
    sampler = build_sampler(lake, imp, seed, snap, geometry, sharded) if imp else None
    augment = build_augmenter(lake, gen, snap, geometry, None if geometry is not None else terms) if gen else None
    source = snap if geometry is None else GeometryOverlay(snap, geometry)
    return LakeParts(source, sampler, augment, lake_identity(lake), int(snap.version))


def config_defaults(lake: "Lake") -> dict[str, Any]:
    """The stream budgets a lake's config provides (`StreamOptions.with_defaults`)."""
    cfg = lake.config
    return {"device": cfg.device, "seed": cfg.seed, "warm_bytes": cfg.warm_bytes, "hot_bytes": cfg.hot_bytes,
            "prefetch": cfg.prefetch}


def stream_layout(source: Any, opts: StreamOptions) -> Any:
    """The shuffle layout (`m2m.stream.order.Layout`) of a stream of ``source`` (a snapshot or another
    `RowSource`) with ``opts`` (defaults applied), as `m2m.stream.spec.plan_stream` will choose it."""
    from m2m.stream import columns as cols
    from m2m.stream.order import choose_layout

    return choose_layout(source.num_rows, cols.nominal_row_bytes(source), int(opts.warm_bytes or 0), opts.shuffle,
                         opts.shuffle_mode, opts.block_rows)


def export_to_dataloader(lake: "Lake", options: StreamOptions | None = None, **overrides: Any) -> StreamLoader:
    """See `Lake.export_to_dataloader`. Never writes to the lake: geometry a mode needs and the pinned
    snapshot lacks is computed in memory for this loader (no commit, no lock)."""
    from m2m.sampling.sharded import ShardedImportance
    from m2m.stream.shuffle import BLOCK, FULL

    opts = StreamOptions.merged(options, overrides).with_defaults(config_defaults(lake))
    gen = generate_mode(opts.generate_samples)
    imp = importance_mode(opts.importance_sampling, list(lake.manifest.metadata))
    mode = stream_layout(lake.snapshot, opts).mode if gen is not None or imp is not None else None
    parts = lake_parts(lake, gen, imp, int(opts.seed or 0), shard_local=gen is not None and mode != FULL,
                       columns=opts.columns)
    if isinstance(parts.sampler, ShardedImportance) and mode == BLOCK and opts.shard_affinity is None:
        # a sharded plan with shard affinity draws only the rank's shards' rows (without it, the whole
        # epoch's draws in every rank): the default wherever the order is a block shuffle
        opts = dataclasses.replace(opts, shard_affinity=True)
    return make_loader(parts.source, opts, sampler=parts.sampler, augment=parts.augment, lake=parts.identity,
                       version=parts.version)
