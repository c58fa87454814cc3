"""`M2MConfig`: every knob of a lake and its stream, validated at construction."""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any

from m2m._validate import is_flag
from m2m.errors import ConfigError, ConfigTypeError

_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
_DTYPES = ("float32", "float16")

DEFAULT_WARM_BYTES = 4 << 30
DEFAULT_HOT_BYTES = 2 << 30
DEFAULT_SHARD_BYTES = 128 << 20


class _DefaultDtype(str):
    """``M2MConfig.storage_dtype`` left at its default: "float32" for a new lake, while a lake that
    exists keeps its own (`dtype_given`). `create_m2m(M2MConfig(path, latent_dim))` over a float16 lake
    was refused ("the config asks for storage_dtype='float32'") though nobody asked for it. Equal to
    "float32" in every use; survives `dataclasses.replace`, copies and pickling."""

    __slots__ = ()


def dtype_given(config: "M2MConfig") -> bool:
    """Whether ``config.storage_dtype`` was set (rather than left at its default)."""
    return not isinstance(config.storage_dtype, _DefaultDtype)


@dataclass(frozen=True)
class M2MConfig:
    """Configuration of a lake handle and the streams it exports.

    Attributes:
        path: lake directory or fsspec URL; None creates a temporary lake deleted on close.
        latent_dim: vector dimension; vectors of any other width are rejected.
        storage_dtype: element type the shards hold ("float32" or "float16"); the default makes new
            lakes float32 and lets an existing lake keep its own (a value given must match it).
        device: where batches are delivered ("cpu", "cuda", "cuda:N").
        knn_k: neighbours used for kappa estimation and Langevin/mixture augmentation.
        langevin_steps: Langevin steps per augmented row.
        langevin_dt: dimensionless Langevin step size: h = dt / max(kappa_row/T, d-1) (the row's own
            kappa); 0.06 with 5 steps moves a row about half as far from its mean as an exact vMF draw
            (mean cosine ~0.95); at d >= 64 the chain stays in the row's own component.
        langevin_T: temperature of the Langevin target p^(1/T); for generate_samples="mixture", each
            component becomes vMF(mu_j, kappa_j/T) with its mass kept (1.0: the exact mixture).
        soc_threshold: redundancy fraction at which consolidation is advised (``criticality()``).
        consolidate_similarity: cosine at which two splats count as near-duplicates.
        auto_consolidate: consolidate after ``add_splats`` when the lake turns supercritical.
        auto_compact: 0 (off) or N >= 2: after an append, compact (`Lake.compact` to ``shard_bytes``)
            when at least N small shards could be merged (a lake fed by many small appends).
        seed: base seed of every random order and augmentation.
        warm_bytes: RAM budget of the warm tier.
        hot_bytes: device-memory budget of the hot tier.
        shard_bytes: target size of one shard file.
        prefetch: work items the background prefetch thread keeps ready (0: run the stages in the
            consuming thread).
        verify_reads: check each shard file's CRC32 the first time a lake handle reads it, whichever
            version and operation reads it (one extra sequential read of the lake per handle;
            `Lake.verify` always checks).
        storage_options: fsspec options of a remote lake (s3://, gs://, az://, ...): endpoint, credentials,
            region; passed to ``fsspec.url_to_fs`` (kept out of ``repr``: it may hold secrets).
        io_timeout: seconds a remote request may take to connect and between bytes read before it is
            retried (S3: botocore connect/read timeouts).
        io_retries: retries of a remote request after a transient error (timeout, refused connection,
            5xx), with exponential backoff; then `ObjectStoreError` names the object.
        cache_dir: node-local disk cache of a remote (fsspec URL) lake's shards, shared by every
            process of the node that names it and kept after close; None: ``$M2M_CACHE_DIR`` if set,
            else a private temporary directory removed when the lake closes (see `m2m.lake.cache`).
        cache_bytes: byte budget of that cache (LRU eviction by shard file); None: half the free
            space of its disk, at most 64 GiB.
        lake_key: key of a signed lake (str or bytes; None: ``$M2M_LAKE_KEY`` if set): every manifest
            written carries an HMAC-SHA256 under it, and a manifest without a matching one is refused
            (kept out of ``repr``: it is a secret). See docs/format.md, "Integrity".
    """

    path: str | os.PathLike[str] | None = None
    latent_dim: int = 640
    storage_dtype: str = _DefaultDtype("float32")
    device: str = "cpu"
    knn_k: int = 16
    langevin_steps: int = 5
    langevin_dt: float = 0.06
    langevin_T: float = 1.0
    soc_threshold: float = 0.2
    consolidate_similarity: float = 0.95
    auto_consolidate: bool = False
    auto_compact: int = 0
    seed: int = 0
    warm_bytes: int = DEFAULT_WARM_BYTES
    hot_bytes: int = DEFAULT_HOT_BYTES
    shard_bytes: int = DEFAULT_SHARD_BYTES
    prefetch: int = 4
    verify_reads: bool = True
    storage_options: dict[str, Any] | None = field(default=None, repr=False, hash=False)
    io_timeout: float = 10.0
    io_retries: int = 3
    cache_dir: str | os.PathLike[str] | None = None
    cache_bytes: int | None = None
    lake_key: str | bytes | None = field(default=None, repr=False, hash=False, compare=False)

    def _plain_numbers(self) -> None:
        if type(self.device).__module__ == "torch" and type(self.device).__name__ == "device":
            object.__setattr__(self, "device", str(self.device))  # (StreamOptions took one; this refused it)
        for f in dataclasses.fields(self):   # the int and float fields, by their annotations
            real = f.type in ("float", "float | None")
            if real or f.type in ("int", "int | None"):
                value = getattr(self, f.name)
                plain = _plain(value, real)
                if plain is not value:
                    object.__setattr__(self, f.name, plain)

    def __post_init__(self) -> None:
        self._plain_numbers()
        path_ok = self.path is None or isinstance(self.path, (str, os.PathLike))
        _check(path_ok and (self.path is None or bool(os.fspath(self.path).strip())), "path", self.path,
               "None, a directory path or an fsspec URL ('' names no folder)", path_ok)
        _check(_is_int(self.latent_dim) and self.latent_dim >= 2, "latent_dim", self.latent_dim, "an int >= 2",
               _is_int(self.latent_dim))
        _check(self.storage_dtype in _DTYPES, "storage_dtype", self.storage_dtype, f"one of {_DTYPES}",
               isinstance(self.storage_dtype, str))
        _check(isinstance(self.device, str) and bool(_DEVICE_RE.match(self.device)), "device", self.device,
               "'cpu', 'cuda' or 'cuda:N' (streams deliver there; on MPS stream on 'cpu' and move batches)",
               isinstance(self.device, str))
        for name, low in (("knn_k", 1), ("langevin_steps", 0), ("seed", 0), ("warm_bytes", 0), ("hot_bytes", 0),
                          ("prefetch", 0)):
            value = getattr(self, name)
            _check(_is_int(value) and value >= low, name, value, f"an int >= {low}"
                   + {"warm_bytes": " (bytes)", "hot_bytes": " (bytes)",
                      "prefetch": " (0 = no background thread)"}.get(name, ""), _is_int(value))
        _check(_is_pos(self.langevin_dt) and self.langevin_dt <= 1.0, "langevin_dt", self.langevin_dt,
               "a float in (0, 1]", _is_real(self.langevin_dt))
        _check(_is_pos(self.langevin_T), "langevin_T", self.langevin_T, "a finite float > 0", _is_real(self.langevin_T))
        _check(_is_num(self.soc_threshold) and 0.0 < self.soc_threshold < 1.0, "soc_threshold", self.soc_threshold,
               "a float in (0, 1)", _is_real(self.soc_threshold))
        sim = self.consolidate_similarity  # (above 1 - 1e-6 it was taken as 1 - 1e-6 without a word)
        _check(_is_num(sim) and (0.0 < sim <= 1.0 - 1e-6 or sim == 1.0), "consolidate_similarity", sim,
               "a float in (0, 0.999999] or 1.0 (identical up to float32 rounding)", _is_real(sim))
        for name in ("auto_consolidate", "verify_reads"):
            # a string such as "false" is truthy: taken as a bool it would turn the option on
            value = getattr(self, name)
            _check(is_flag(value), name, value, "True or False", False)
            object.__setattr__(self, name, bool(value))
        _check(_is_int(self.auto_compact) and (self.auto_compact == 0 or self.auto_compact >= 2), "auto_compact",
               self.auto_compact, "0 (off) or an int >= 2 (small shards that trigger a compaction)",
               _is_int(self.auto_compact))
        _check(_is_int(self.shard_bytes) and self.shard_bytes >= 1 << 16, "shard_bytes", self.shard_bytes,
               "an int >= 65536 (bytes)", _is_int(self.shard_bytes))
        key_type = self.lake_key is None or isinstance(self.lake_key, (str, bytes))
        _check(key_type and (self.lake_key is None or len(self.lake_key) > 0), "lake_key", "<secret>",
               "None or a non-empty str/bytes", key_type)
        _check(self.storage_options is None or isinstance(self.storage_options, dict), "storage_options",
               self.storage_options, "a dict of fsspec options or None", False)
        _check(_is_pos(self.io_timeout), "io_timeout", self.io_timeout, "a finite float > 0 (seconds)",
               _is_real(self.io_timeout))
        _check(_is_int(self.io_retries) and 0 <= self.io_retries <= 20, "io_retries", self.io_retries,
               "an int in [0, 20]", _is_int(self.io_retries))
        path_ok = isinstance(self.cache_dir, (str, os.PathLike))  # ("" failed later in os.makedirs, unnamed)
        _check(self.cache_dir is None or (path_ok and bool(str(os.fspath(self.cache_dir)).strip())), "cache_dir",
               self.cache_dir, "None or a directory path", self.cache_dir is None or path_ok)
        _check(self.cache_bytes is None or (_is_int(self.cache_bytes) and self.cache_bytes >= 1), "cache_bytes",
               self.cache_bytes, "None or an int >= 1 (bytes)", self.cache_bytes is None or _is_int(self.cache_bytes))

    def replace(self, **changes: Any) -> M2MConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _plain(value: object, real: bool) -> object:
    """A numpy (or other numbers.Integral / Real) scalar as the Python int or float it stands for (a
    config of ``np.int64(8)`` was refused as "must be an int ... got np.int64(8)", where every other entry
    point took it); anything else (a bool, a string, a tensor) as it is, for the checks to name."""
    if isinstance(value, bool):  # (numpy's bool is neither Integral nor Real)
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if real and isinstance(value, numbers.Real):
        return float(value)
    return value


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)




def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _is_pos(v: object) -> bool:
    # _is_num narrowed v to a number; mypy keeps it object
    return _is_num(v) and v > 0  # type: ignore[operator]


def _check(ok: bool, field: str, value: object, expected: str, type_ok: bool) -> None:
    """`ConfigError` naming the field unless ``ok``; `ConfigTypeError` (also a TypeError) when the
    value's type is wrong (``type_ok`` False), not just its range."""
    if not ok:
        cls = ConfigError if type_ok else ConfigTypeError
        raise cls(f"M2MConfig.{field} must be {expected}, got {value!r}")
