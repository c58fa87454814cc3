"""Boundary validation of user input: everything is checked before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from m2m.errors import ConfigError, DimensionMismatchError, InvalidEmbeddingError

VALIDATE_CHUNK_ROWS = 65536


def check_int(value: Any, name: str, low: int = 1) -> int:
    """``value`` as an int >= ``low``, or `ConfigError` naming ``name``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def as_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view (or copy) of a numpy array, torch tensor on any device, list or scalar."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.dtype == torch.bfloat16:
                t = t.float()
            return t.cpu().numpy()
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InvalidEmbeddingError(f"{name} could not be read as an array: {exc}") from exc


def as_vectors(vectors: Any, dim: int | None, name: str = "vectors", allow_empty: bool = False) -> np.ndarray:
    """Check shape and dtype of ``vectors``; return a 2-D float array (a view where possible)."""
    arr = as_numpy(vectors, name)
    if arr.dtype == object:
        raise InvalidEmbeddingError(f"{name} must be a rectangular numeric array (got ragged or object data)")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise InvalidEmbeddingError(f"{name} must have shape [n, dim] or [dim], got shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidEmbeddingError(f"{name} must be a real float or int array, got dtype {arr.dtype}")
    if arr.shape[0] == 0 and not allow_empty:
        raise InvalidEmbeddingError(f"{name} is empty (0 rows)")
    if dim is not None and arr.shape[1] != dim:
        raise DimensionMismatchError(f"{name} have dimension {arr.shape[1]}, expected latent_dim {dim}")
    return arr


def check_rows(arr: np.ndarray, start: int = 0, name: str = "vectors") -> None:
    """Raise if any row of ``arr`` is non-finite or has zero norm (row numbers offset by ``start``)."""
    for lo in range(0, arr.shape[0], VALIDATE_CHUNK_ROWS):
        chunk = np.asarray(arr[lo : lo + VALIDATE_CHUNK_ROWS], dtype=np.float32)
        sq = np.einsum("ij,ij->i", chunk, chunk)
        suspect = ~(sq > 0) | ~np.isfinite(sq)  # NaN, Inf, zero, or a finite row whose square overflows
        if not suspect.any():
            continue
        for row in np.flatnonzero(suspect):  # only the few suspect rows are looked at one by one
            values = chunk[row]
            if not np.isfinite(values).all():
                raise InvalidEmbeddingError(f"{name} row {start + lo + int(row)} contains NaN or Inf")
            if not np.any(values != 0):
                raise InvalidEmbeddingError(f"{name} row {start + lo + int(row)} is a zero vector")


def normalise_rows(chunk: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Unit-norm float32 copy of a validated chunk (rows whose squared norm overflows are rescaled first).

    ``out``: an optional float32 buffer of the chunk's shape to write into (avoids fresh pages).
    """
    src = np.asarray(chunk)
    if src.dtype != np.float32:
        src = src.astype(np.float32)
    sq = np.einsum("ij,ij->i", src, src)
    big = ~np.isfinite(sq)
    if big.any():
        src = src.copy()
        src[big] /= np.abs(src[big]).max(axis=1, keepdims=True)
        sq[big] = np.einsum("ij,ij->i", src[big], src[big])
    if out is None:
        out = np.empty(src.shape, dtype=np.float32)
    np.divide(src, np.sqrt(sq)[:, None], out=out)
    return out


def positive_column(values: Any, n: int, name: str, allow_nan: bool = False) -> np.ndarray:
    """A float32 [n] column of finite, strictly positive values (NaN allowed when ``allow_nan``)."""
    arr = as_numpy(values, name)
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype=np.float32) if n else arr.reshape(0)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidEmbeddingError(f"{name} must have shape [{n}] to match vectors, got {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidEmbeddingError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    nan = np.isnan(arr)
    if nan.any() and not allow_nan:
        raise InvalidEmbeddingError(f"{name} row {int(np.argmax(nan))} is NaN")
    bad = ~nan & ~((arr > 0) & np.isfinite(arr))
    if bad.any():
        row = int(np.argmax(bad))
        raise InvalidEmbeddingError(f"{name} row {row} is {arr[row]!r}; {name} must be finite and > 0")
    return arr


def label_column(labels: Any, n: int) -> np.ndarray:
    """Labels as int64 or str [n]."""
    arr = as_numpy(labels, "labels")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidEmbeddingError(f"labels must have shape [{n}] to match vectors, got {tuple(arr.shape)}")
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            row = int(np.argmax(~np.isfinite(arr) | (arr != np.round(arr))))
            raise InvalidEmbeddingError(f"labels row {row} is {arr[row]!r}; labels must be ints or strings")
        return arr.astype(np.int64)
    if arr.dtype.kind in ("U", "S", "O"):
        out = arr.astype(object)
        for i, v in enumerate(out):  # labels are validated once per add; strings need a per-value check
            if not isinstance(v, (str, bytes)):
                raise InvalidEmbeddingError(f"labels row {i} is {v!r}; labels must be all ints or all strings")
        return np.asarray([v.decode() if isinstance(v, bytes) else v for v in out], dtype=object)
    raise InvalidEmbeddingError(f"labels must be ints or strings, got dtype {arr.dtype}")


RESERVED_COLUMNS = frozenset({"id", "mu", "kappa", "alpha", "label", "neighbors", "embedding", "weight"})


def metadata_columns(metadata: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    """User columns as 1-D arrays of length n (numeric or string)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidEmbeddingError(f"metadata must be a dict of column name -> [n] array, got {type(metadata)}")
    out: dict[str, np.ndarray] = {}
    for name, values in metadata.items():
        if not isinstance(name, str) or not name:
            raise InvalidEmbeddingError(f"metadata column names must be non-empty strings, got {name!r}")
        if name in RESERVED_COLUMNS:
            raise InvalidEmbeddingError(f"metadata column {name!r} clashes with a built-in column")
        arr = as_numpy(values, f"metadata[{name!r}]")
        if arr.ndim != 1 or arr.shape[0] != n:
            raise InvalidEmbeddingError(
                f"metadata[{name!r}] must have shape [{n}] to match vectors, got {tuple(arr.shape)}")
        if arr.dtype.kind in ("U", "S"):
            arr = arr.astype(object)
        out[name] = arr
    return out


@dataclass(frozen=True)
class SplatBatch:
    """Validated input of one ``add_splats`` call (mu not yet normalised: chunks are normalised on write)."""

    vectors: np.ndarray
    labels: np.ndarray | None
    kappa: np.ndarray
    alpha: np.ndarray
    metadata: dict[str, np.ndarray]
    ids: np.ndarray | None = None  # explicit ids (consolidation keeps ids); None = assign new ones

    @property
    def rows(self) -> int:
        return int(self.vectors.shape[0])


def validate_splats(vectors: Any, labels: Any, kappa: Any, alpha: Any, metadata: Any, dim: int,
                    start: int = 0) -> SplatBatch:
    """Validate one ``add_splats`` call completely, raising `InvalidEmbeddingError` on the first problem.

    ``start`` offsets the row numbers in error messages (for chunked ingest).
    """
    arr = as_vectors(vectors, dim)
    check_rows(arr, start)
    if start:
        try:
            return _columns(arr, labels, kappa, alpha, metadata)
        except InvalidEmbeddingError as exc:
            raise InvalidEmbeddingError(f"in the chunk starting at row {start}: {exc}") from exc
    return _columns(arr, labels, kappa, alpha, metadata)


def _columns(arr: np.ndarray, labels: Any, kappa: Any, alpha: Any, metadata: Any) -> SplatBatch:
    n = arr.shape[0]
    lab = None if labels is None else label_column(labels, n)
    kap = (np.full(n, np.nan, dtype=np.float32) if kappa is None
           else positive_column(kappa, n, "kappa"))
    alp = np.ones(n, dtype=np.float32) if alpha is None else positive_column(alpha, n, "alpha")
    meta = metadata_columns(metadata, n)
    return SplatBatch(arr, lab, kap, alp, meta)
