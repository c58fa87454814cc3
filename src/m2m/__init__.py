"""m2m: an embedding training data lake that streams Gaussian splats on the sphere into PyTorch.

Heavy submodules (torch, FAISS) load on first use, so ``import m2m`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from m2m import _wiring  # noqa: F401  (registers the stream and Ray behind lake methods: m2m.plugins)
from m2m.config import M2MConfig
from m2m.errors import (
    AlreadyExistsError,
    CacheTimeoutError,
    CommitConflictError,
    ConfigError,
    ConfigTypeError,
    CorruptShardError,
    DeviceUnavailableError,
    DimensionMismatchError,
    InternalError,
    InvalidEmbeddingError,
    InvalidManifestError,
    LakeClosedError,
    LakeLockedError,
    LakeNotFoundError,
    M2MError,
    MissingDependencyError,
    NumericalError,
    ObjectStoreError,
    PathNotFoundError,
    PositionError,
    ReadOnlyLakeError,
    SignatureError,
    StateMismatchError,
    StreamError,
    UnknownColumnError,
    UnknownIdError,
    WriteFailedError,
)

if TYPE_CHECKING:  # pragma: no cover
    from m2m.api import create_m2m, open_lake
    from m2m.augment import langevin
    from m2m.geometry import vmf
    from m2m.lake.lake import Lake
    from m2m.stream.dataset import StreamDataset as M2MDataLake
    from m2m.stream.mixture import Mixture, mix
    from m2m.stream.options import StreamOptions

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "CacheTimeoutError",
    "CommitConflictError",
    "ConfigError",
    "ConfigTypeError",
    "CorruptShardError",
    "DeviceUnavailableError",
    "DimensionMismatchError",
    "InternalError",
    "InvalidEmbeddingError",
    "InvalidManifestError",
    "Lake",
    "LakeClosedError",
    "LakeLockedError",
    "LakeNotFoundError",
    "M2MConfig",
    "M2MDataLake",
    "M2MError",
    "MissingDependencyError",
    "Mixture",
    "NumericalError",
    "ObjectStoreError",
    "PathNotFoundError",
    "PositionError",
    "ReadOnlyLakeError",
    "SignatureError",
    "StateMismatchError",
    "StreamError",
    "StreamOptions",
    "UnknownColumnError",
    "UnknownIdError",
    "WriteFailedError",
    "create_m2m",
    "langevin",
    "mix",
    "open_lake",
    "vmf",
]

_LAZY = {
    "create_m2m": ("m2m.api", "create_m2m"),
    "open_lake": ("m2m.api", "open_lake"),
    "Lake": ("m2m.lake.lake", "Lake"),
    # the seed's name for the dataset behind export_to_dataloader (the class itself; iterable-style for torch,
    # though not an IterableDataset subclass: docs/stream.md)
    "M2MDataLake": ("m2m.stream.dataset", "StreamDataset"),
    "StreamOptions": ("m2m.stream.options", "StreamOptions"),
    "Mixture": ("m2m.stream.mixture", "Mixture"),
    "mix": ("m2m.stream.mixture", "mix"),
    "vmf": ("m2m.geometry.vmf", None),
    "langevin": ("m2m.augment.langevin", None),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'm2m' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
