"""Wire a lake snapshot, the SOC sampler and the augmenter into a stream (`Lake.export_to_dataloader`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from m2m.errors import ConfigError
from m2m.sampling.importance import BUILTIN_MODES

if TYPE_CHECKING:  # pragma: no cover
    from m2m.lake.lake import Lake
    from m2m.stream.loader import StreamLoader

logger = logging.getLogger(__name__)

GENERATE_MODES = ("langevin", "vmf")


def generate_mode(generate_samples: Any) -> str | None:
    """False -> None, True -> "langevin", "langevin"/"vmf" as is; anything else is a ConfigError."""
    if generate_samples is False or generate_samples is None:
        return None
    if generate_samples is True:
        return "langevin"
    if isinstance(generate_samples, str) and generate_samples in GENERATE_MODES:
        return generate_samples
    raise ConfigError(f"generate_samples must be False, True, 'langevin' or 'vmf', got {generate_samples!r}")


def importance_mode(importance_sampling: Any, metadata: Sequence[str]) -> str | None:
    """False -> None, True -> "kappa", "kappa"/"alpha"/"loss"/a numeric metadata column as is."""
    if importance_sampling is False or importance_sampling is None:
        return None
    if importance_sampling is True:
        return "kappa"
    if isinstance(importance_sampling, str) and (importance_sampling in BUILTIN_MODES
                                                 or importance_sampling in metadata):
        return importance_sampling
    raise ConfigError(f"importance_sampling must be False, True, 'kappa', 'alpha', 'loss' or a metadata column "
                      f"({list(metadata)}), got {importance_sampling!r}")


def build_sampler(lake: "Lake", mode: str, seed: int) -> Any:
    """The importance sampler of ``mode`` over the lake's current snapshot."""
    from m2m.sampling.samplers import ImportanceSampler, LossSampler

    alpha = lake.snapshot.read_all("alpha").astype(np.float64)
    if mode == "loss":
        return LossSampler(alpha, ids=lake.snapshot.ids(), seed=seed)
    if mode in ("kappa", "alpha"):
        column = None
    else:
        column = lake.snapshot.read_all(mode)
        if not np.issubdtype(column.dtype, np.number):
            raise ConfigError(f"importance_sampling column {mode!r} is not numeric (dtype {column.dtype})")
    kappa = filled_kappa(lake.snapshot.read_all("kappa"), lake.dim) if mode == "kappa" else None
    return ImportanceSampler(mode=mode, alpha=alpha, kappa=kappa, column=column, seed=seed)


def filled_kappa(kappa: np.ndarray, dim: int) -> np.ndarray:
    """kappa with NaN (splats with no valid neighbour) replaced by the median estimate (or ``dim``)."""
    missing = np.isnan(kappa)
    if not missing.any():
        return kappa
    finite = kappa[~missing]
    fill = float(np.median(finite)) if len(finite) else float(dim)
    logger.info("%d splats have no kappa estimate; using %.4g for them", int(missing.sum()), fill)
    return np.where(missing, np.float32(fill), kappa).astype(np.float32)


def build_augmenter(lake: "Lake", mode: str) -> Any:
    """The Langevin or vMF augmenter over the lake's current snapshot (kappa must be estimated)."""
    cfg = lake.config
    kappa = filled_kappa(lake.snapshot.read_all("kappa").astype(np.float32), lake.dim)
    if mode == "vmf":
        from m2m.augment.augmenter import VMFAugmenter

        return VMFAugmenter(kappa)
    from m2m.augment.augmenter import LangevinAugmenter

    labels = lake.snapshot.read_all("label") if lake.manifest.label_type is not None else None
    return LangevinAugmenter(neighbors=lake.snapshot.read_all("neighbors"), kappa=kappa,
                             alpha=lake.snapshot.read_all("alpha").astype(np.float32), labels=labels,
                             steps=cfg.langevin_steps, step_size=cfg.langevin_dt, temperature=cfg.langevin_T,
                             neighbor_cos=lake.snapshot.read_all("neighbor_cos"))


def export_to_dataloader(lake: "Lake", batch_size: int = 256, shuffle: bool = True, drop_last: bool = False,
                         generate_samples: Any = False, importance_sampling: Any = False,
                         columns: Sequence[str] | None = None, num_workers: int = 0, rank: int | None = None,
                         world_size: int | None = None, seed: int | None = None, epoch: int = 0,
                         **stream_options: Any) -> "StreamLoader":
    """See `Lake.export_to_dataloader`."""
    from m2m.lake.neighbourhood import needs_geometry
    from m2m.stream.loader import make_loader

    cfg = lake.config
    gen = generate_mode(generate_samples)
    imp = importance_mode(importance_sampling, list(lake.manifest.metadata))
    if len(lake) == 0:
        raise ConfigError(f"lake {lake.path} is empty: add splats before exporting a stream")
    kappa_missing = lake.manifest.stats.get("kappa", {}).get("count", 0) < len(lake)
    wants_kappa = gen == "langevin" or (kappa_missing and (gen == "vmf" or imp == "kappa"))
    if wants_kappa and needs_geometry(lake.manifest, cfg.knn_k):  # Langevin also needs the neighbour table
        lake.estimate_kappa()
    seed = cfg.seed if seed is None else seed
    sampler = build_sampler(lake, imp, seed) if imp else None
    augment = build_augmenter(lake, gen) if gen else None
    options = {"warm_bytes": cfg.warm_bytes, "hot_bytes": cfg.hot_bytes, "prefetch": cfg.prefetch, **stream_options}
    return make_loader(lake.snapshot, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, columns=columns,
                       device=cfg.device, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                       num_workers=num_workers, sampler=sampler, augment=augment, **options)
