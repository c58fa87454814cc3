"""The seed API: `create_m2m` and `open_lake`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from m2m._validate import check_int
from m2m.config import M2MConfig
from m2m.errors import (
    ConfigTypeError,
    CorruptShardError,
    DeviceUnavailableError,
    DimensionMismatchError,
    LakeNotFoundError,
)
from m2m.lake.fs import open_fs
from m2m.lake.lake import Lake, check_compatible, create_empty
from m2m.lake.manifest import Manifest, read_manifest, use_key
from m2m.lake.tempdirs import create_temporary


def check_device(device: str) -> None:
    """Raise `DeviceUnavailableError` now if ``device`` cannot be used on this machine."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"M2MConfig.device={device!r} but CUDA is not available on this machine")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"M2MConfig.device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")


def create_m2m(config: M2MConfig | None = None) -> Lake:
    """Create the lake at ``config.path`` (or open it if it exists); a temporary lake when path is None.

    Example: ``with create_m2m(M2MConfig(path="lake/", latent_dim=64)) as lake: lake.add_splats(vectors)``.
    """
    config = config or M2MConfig()
    if not isinstance(config, M2MConfig):
        raise ConfigTypeError(f"create_m2m takes an M2MConfig, got {type(config).__name__}")
    check_device(config.device)
    temporary = None
    if config.path is None:
        temporary = create_temporary()  # removed with the lake, at exit, or by a later create_m2m
        path: str = temporary
    else:
        path = os.fspath(config.path)
    fs = open_fs(path, config.storage_options, config.io_timeout, config.io_retries, config.cache_dir,
                 config.cache_bytes)
    use_key(fs, config.lake_key)
    try:
        manifest = read_manifest(fs)
    except LakeNotFoundError:
        manifest = create_empty(fs, config)
    else:
        check_compatible(manifest, config, path)
        config = dataclasses.replace(config, storage_dtype=manifest.dtype)  # (the default yields to the lake's)
    return Lake(fs, config, manifest, temporary_dir=temporary)


def open_lake(path: str | os.PathLike[str], config: M2MConfig | None = None, version: int | None = None,
              **overrides: Any) -> Lake:
    """Open an existing lake; `LakeNotFoundError` (a FileNotFoundError) when there is none at ``path``.

    The lake's own dim and dtype are used, and without ``config`` or a ``knn_k`` override the ``knn_k``
    its kappa was estimated with; other settings come from ``config`` and ``overrides``
    (e.g. ``storage_options={...}`` for s3://, gs://, az:// lakes). ``version`` pins an older
    committed version (default: the latest); commits still go on top of the latest. Older versions
    stay readable when a newer manifest is corrupt (`CorruptShardError` names it).

    Example: ``lake = open_lake("lake/")``, ``open_lake("lake/", version=3)``,
    ``open_lake("s3://bucket/lake", storage_options={"endpoint_url": "http://127.0.0.1:9000"})``.
    """
    if version is not None:
        version = check_int(version, "version", 0)
    if config is not None and not isinstance(config, M2MConfig):
        raise ConfigTypeError(f"open_lake(config=...) takes an M2MConfig, got {type(config).__name__} "
                              "(settings can also be given as keywords: open_lake(path, knn_k=32))")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigTypeError(f"open_lake takes a lake path or URL, got {path!r}")
    base = config or M2MConfig()
    known = {f.name for f in dataclasses.fields(M2MConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigTypeError(f"open_lake: unknown setting(s) {unknown}; M2MConfig has {sorted(known)}")
    asked = dataclasses.replace(base, path=os.fspath(path), **overrides)  # validates the overrides
    fs = open_fs(path, asked.storage_options, asked.io_timeout, asked.io_retries, asked.cache_dir, asked.cache_bytes)
    use_key(fs, asked.lake_key)
    try:
        return _open_version(fs, path, version, config, asked, overrides)
    except BaseException:
        getattr(fs, "close", lambda: None)()  # a private shard cache directory goes with it
        raise


def _open_version(fs: Any, path: str | os.PathLike[str], version: int | None, config: M2MConfig | None,
                  asked: M2MConfig, overrides: dict[str, Any]) -> Lake:
    """`open_lake` past opening the store (``fs``, which the caller closes if this raises)."""
    manifest = read_manifest(fs, version)   # LakeNotFoundError ("no m2m lake at ...") when there is none
    if config is not None:
        check_compatible(manifest, asked, os.fspath(path))
    for name, have in (("latent_dim", manifest.dim), ("storage_dtype", manifest.dtype)):
        if name in overrides and overrides[name] != have:   # (these keywords were dropped silently)
            raise DimensionMismatchError(f"lake {os.fspath(path)} has {name} {have!r}, open_lake was given "
                                         f"{name}={overrides[name]!r} (leave it out: the lake's own is used)")

    def config_of(manifest: Manifest) -> M2MConfig:
        cfg = dataclasses.replace(asked, latent_dim=manifest.dim, storage_dtype=manifest.dtype)
        stored_k = (manifest.geometry or {}).get("k")
        if config is None and "knn_k" not in overrides and isinstance(stored_k, int) and 1 <= stored_k != cfg.knn_k:
            # the neighbourhood size the lake was estimated with: the default would make every augmented
            # stream compute the geometry again in memory, quietly, at another k
            cfg = dataclasses.replace(cfg, knn_k=stored_k)
        return cfg

    check_device(config_of(manifest).device)
    attempt = 0
    while True:
        try:
            return Lake(fs, config_of(manifest), manifest)
        except CorruptShardError as exc:
            # the latest version's files checked at open are gone: a writer published a newer version and
            # vacuumed this one meanwhile (seen 1 in ~16,000 opens beside append + compact + vacuum(keep=1));
            # open the new head, a bounded number of times, rather than call a healthy lake damaged
            if version is not None or not isinstance(exc.__cause__, FileNotFoundError) or attempt == OPEN_RETRIES:
                raise
            latest = read_manifest(fs, None)
            if latest.version <= manifest.version:
                raise
            manifest, attempt = latest, attempt + 1


#: Times `open_lake` of the latest version moves on to a newer head whose writer vacuumed the one it opened
OPEN_RETRIES = 3
