"""Boundary validation of user input: everything is checked before anything is written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from m2m.errors import ConfigError, ConfigTypeError, DimensionMismatchError, InvalidEmbeddingError, in_chunk
from m2m.lake.schema import RESERVED_COLUMNS, reserved_reason  # noqa: F401  (RESERVED_COLUMNS: re-exported)

VALIDATE_CHUNK_ROWS = 65536


def check_int(value: Any, name: str, low: int = 1) -> int:
    """``value`` as an int >= ``low``, or `ConfigError` naming ``name`` (`ConfigTypeError` when it is
    not an int at all)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ConfigTypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def is_flag(value: Any) -> bool:
    """True for a bool, numpy's bool_, or the ints 0 and 1 (as DataLoader flags are often given): the
    one rule of every boolean option (``M2MConfig``, ``StreamOptions``); ``shuffle=2`` is refused."""
    numpy_bool = getattr(getattr(value, "dtype", None), "kind", "") == "b" and getattr(value, "ndim", 1) == 0
    int_flag = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value in (0, 1)
    return isinstance(value, bool) or numpy_bool or int_flag


def check_threads(value: Any, name: str = "threads") -> int:
    """A thread count: an int from 1 to 4 x this machine's cores (at least 8). More is never faster,
    and far more kills the process (observed: ``--threads 20000`` failed to create OpenMP threads,
    100000 segfaulted, with no m2m error)."""
    import os

    cores = os.cpu_count() or 1
    most = max(8, 4 * cores)
    n = check_int(value, name)
    if n > most:
        raise ConfigError(f"{name} must be an int from 1 to {most} (4 x this machine's {cores} cores), got {value!r}")
    return n


def integer_problem(arr: np.ndarray) -> str | None:
    """None when ``arr`` can be ids or positions (an integer dtype, or empty float: ``np.array([])``);
    else ``"dtype D (first: v)"`` for the refusal (a float id would be truncated onto another row)."""
    if arr.dtype.kind in "iu" or (arr.size == 0 and arr.dtype.kind == "f"):
        return None
    if not arr.size:
        return f"dtype {arr.dtype}"
    first = arr.reshape(-1)[0]
    # an object array holds Python objects (a big int, None), which have no .item()
    return f"dtype {arr.dtype} (first: {(first.item() if isinstance(first, np.generic) else first)!r})"


def beyond_int64(arr: np.ndarray) -> int | None:
    """The largest value of a uint64 ``arr`` above int64's range (it would wrap negative), or None."""
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        return int(arr.max())
    return None


def as_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view (or copy) of a numpy array, torch tensor on any device, list or scalar.

    A numpy masked array with a masked entry is refused: these columns have no missing values (its
    data would store the hidden values; metadata columns turn masks into nulls before this).
    """
    if isinstance(x, np.ma.MaskedArray):
        mask = np.ma.getmaskarray(x)
        if mask.any():
            row = int(np.argmax(mask.reshape(mask.shape[0], -1).any(axis=1))) if mask.ndim else 0
            raise InvalidEmbeddingError(f"{name} row {row} is masked (a numpy masked array); {name} cannot hold "
                                        "missing values: fill them or drop those rows")
        return np.ma.getdata(x)
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.layout != torch.strided:   # (a sparse tensor raised torch's own TypeError)
                raise InvalidEmbeddingError(f"{name} is a {t.layout} tensor; give a dense one (t.to_dense())")
            if t.dtype == torch.bfloat16:
                t = t.float()
            try:
                return t.cpu().numpy()
            except TypeError as exc:   # float8 and other dtypes numpy has not: torch's raw TypeError before
                raise InvalidEmbeddingError(f"{name} has dtype {t.dtype}, which numpy cannot hold; convert it "
                                            "(e.g. t.float())") from exc
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InvalidEmbeddingError(f"{name} could not be read as an array: {_ragged_row(x) or exc}") from exc


def _ragged_row(x: Any) -> str | None:
    """For a list of rows of different lengths (numpy's "inhomogeneous shape"), which row differs."""
    if not isinstance(x, (list, tuple)) or not x:
        return None
    try:
        lengths = [len(r) for r in x]
    except TypeError:
        return None
    bad = next((i for i, n in enumerate(lengths) if n != lengths[0]), None)
    return None if bad is None else f"row {bad} has {lengths[bad]} values, row 0 has {lengths[0]}"


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
    """Raise if any row of ``arr`` is non-finite or has zero norm (row numbers offset by ``start``).

    Judged in the input's own precision: a finite float64 row of 1e300 or 1e-300 is valid (it is
    rescaled when normalised), only true NaN/Inf and all-zero rows are refused.
    """
    for lo in range(0, arr.shape[0], VALIDATE_CHUNK_ROWS):
        chunk = np.asarray(arr[lo : lo + VALIDATE_CHUNK_ROWS])
        if chunk.dtype.kind != "f":
            chunk = chunk.astype(np.float64)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            sq = np.einsum("ij,ij->i", chunk, chunk)
        suspect = ~(sq > 0) | ~np.isfinite(sq)  # NaN, Inf, zero, or a finite row whose square over/underflows
        if not suspect.any():
            continue
        for row in np.flatnonzero(suspect):  # only the few suspect rows are looked at one by one
            values = chunk[row]
            if not np.isfinite(values).all():
                raise InvalidEmbeddingError(f"{name} row {start + lo + int(row)} contains NaN or Inf")
            if not np.any(values != 0):
                raise InvalidEmbeddingError(f"{name} row {start + lo + int(row)} is a zero vector")


_SAFE_MAX = 1e18     # float32 rows with max |x| inside [_SAFE_MIN, _SAFE_MAX] have a finite, normal squared norm
_SAFE_MIN = 1e-18


def _as_float32(src: np.ndarray) -> np.ndarray:
    """float32 copy of a validated chunk; rows whose values float32 cannot hold (1e300, 1e-300) are
    divided by their largest |value| first, in the input's precision (the direction is all that is kept)."""
    if src.dtype.kind != "f" or src.dtype.itemsize <= 4:
        return src.astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        top = np.abs(src).max(axis=1)
    out_of_range = (top > _SAFE_MAX) | (top < _SAFE_MIN)
    if not out_of_range.any():
        return src.astype(np.float32)
    scaled = src.copy()
    scaled[out_of_range] /= top[out_of_range, None]
    return scaled.astype(np.float32)


def normalise_rows(chunk: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Unit-norm float32 copy of a validated chunk, safe for any finite non-zero row.

    Rows whose squared norm would overflow or underflow (values above ~1e19 or below ~1e-19, in any
    input precision) are divided by their largest |value| before squaring. ``out``: an optional
    float32 buffer of the chunk's shape to write into (avoids fresh pages).
    """
    src = np.asarray(chunk)
    if src.dtype != np.float32:
        src = _as_float32(src)
    with np.errstate(over="ignore", under="ignore"):
        sq = np.einsum("ij,ij->i", src, src)
    unsafe = ~(sq >= np.float32(_SAFE_MIN) ** 2) | ~np.isfinite(sq)  # overflowed, underflowed or subnormal
    if unsafe.any():
        src = src.copy()
        src[unsafe] /= np.abs(src[unsafe]).max(axis=1, keepdims=True)
        sq[unsafe] = np.einsum("ij,ij->i", src[unsafe], src[unsafe])
    if out is None:
        out = np.empty(src.shape, dtype=np.float32)
    np.divide(src, np.sqrt(sq)[:, None], out=out)
    return out


# A row whose norm is within this of 1 (computed in float64) counts as given at unit norm and is stored
# as given, bit for bit: float32 rows normalised by numpy or torch land within 1-3 float32 epsilons
# of 1 (docs/format.md, "Vectors"), so re-dividing them would only move their last bits.
UNIT_TOLERANCE = 16 * float(np.finfo(np.float32).eps)


def unit_rows(chunk: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(unit float32 rows, float64 norms)`` of a validated chunk, such that ``input = unit * norm``.

    Rows already at unit norm (`UNIT_TOLERANCE`) are copied as given (float32 input: bit-exactly)
    with norm 1.0; other rows are divided by their norm, computed in float64 (so multiplying back
    in float64 gives each float32 input value to within 1 ulp). Any finite non-zero row is safe,
    including float64 rows of 1e300 or 1e-300. ``out``: an optional float32 buffer of the chunk's shape.
    """
    src = np.asarray(chunk)
    if src.dtype.kind not in "fiu" or src.dtype.itemsize > 8:
        src = src.astype(np.float64)
    if out is None:
        out = np.empty(src.shape, dtype=np.float32)
    with np.errstate(over="ignore", under="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", src, src, dtype=np.float64))
    # only float64 input can overflow or underflow a float64 square (float32's range squared fits)
    unsafe = ~np.isfinite(norms) | ~(norms >= 1e-150) if src.dtype == np.float64 else None
    unit = np.abs(norms - 1.0) <= UNIT_TOLERANCE
    scale = np.where(unit, 1.0, 1.0 / np.where(norms > 0, norms, 1.0))
    np.multiply(src, scale[:, None], out=out, casting="same_kind")  # in float64, rounded once to float32
    norms[unit] = 1.0
    if unsafe is not None and unsafe.any():
        rows = src[unsafe]
        top = np.abs(rows).max(axis=1, keepdims=True)
        scaled = rows / top
        inner = np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
        out[unsafe] = scaled / inner[:, None]
        norms[unsafe] = top[:, 0] * inner
    return out, norms


def positive_column(values: Any, n: int, name: str, allow_nan: bool = False, allow_zero: bool = False) -> np.ndarray:
    """A float32 [n] column of finite, strictly positive values (NaN allowed when ``allow_nan``, 0 when
    ``allow_zero``)."""
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
    bad = ~nan & ~(((arr >= 0) if allow_zero else (arr > 0)) & np.isfinite(arr))
    if bad.any():
        row = int(np.argmax(bad))
        raise InvalidEmbeddingError(f"{name} row {row} is {arr[row]!r}; {name} must be finite and "
                                    f"{'>= 0' if allow_zero else '> 0'}")
    return arr


_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_LABEL_RULE = "labels must be integers representable in int64, or strings"


def _bad_label(row: int, value: Any) -> InvalidEmbeddingError:
    return InvalidEmbeddingError(f"labels row {row} is {value!r}; {_LABEL_RULE}")


def label_column(labels: Any, n: int) -> np.ndarray:
    """Labels as int64 or str [n]; `InvalidEmbeddingError` naming the first label that is neither
    an integer representable in int64 (no rounding, wrapping or saturation) nor a string."""
    if isinstance(labels, (list, tuple)) and labels:  # numpy would silently turn [1, "a"] into strings
        first = isinstance(labels[0], (str, bytes))
        for i, v in enumerate(labels):
            if isinstance(v, (str, bytes)) != first:
                raise InvalidEmbeddingError(f"labels row {i} is {v!r}; labels must be all ints or all strings")
    arr = as_numpy(labels, "labels")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidEmbeddingError(f"labels must have shape [{n}] to match vectors, got {tuple(arr.shape)}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.unsignedinteger) and arr.dtype.itemsize >= 8:
        big = arr > np.uint64(_I64_MAX)
        if big.any():
            row = int(np.argmax(big))
            raise _bad_label(row, int(arr[row]))
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        # float64 holds -2**63 exactly and 2**63 is the first value past int64: compare, never cast, first
        # (float16 values compared as float64: 2.0 ** 63 cast to float16 overflowed with a RuntimeWarning)
        if arr.dtype.itemsize < 8:
            arr = arr.astype(np.float64)
        with np.errstate(invalid="ignore"):
            ok = (arr == np.floor(arr)) & (arr >= -(2.0 ** 63)) & (arr < 2.0 ** 63)  # NaN and Inf fail
        if not ok.all():
            row = int(np.argmax(~ok))
            raise _bad_label(row, arr[row].item())
        return arr.astype(np.int64)
    if arr.dtype.kind in ("U", "S", "O"):
        out = arr.astype(object)
        values = out.tolist()
        if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
            for i, v in enumerate(values):  # Python ints of any size (numpy gave up on a common dtype)
                if not _I64_MIN <= int(v) <= _I64_MAX:
                    raise _bad_label(i, v)
            return np.asarray(values, dtype=np.int64)
        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        # labels are validated once per add; name the first value unlike the first one (ints or strings)
        kind = is_int if values and is_int(values[0]) else (lambda v: isinstance(v, (str, bytes)))
        for i, v in enumerate(values):
            if not kind(v):
                raise InvalidEmbeddingError(f"labels row {i} is {v!r}; labels must be all ints or all strings")
        return utf8_strings(values, "labels")
    raise InvalidEmbeddingError(f"labels must be ints or strings, got dtype {arr.dtype}")


def utf8_strings(values: list[Any], name: str, allow_none: bool = False) -> np.ndarray:
    """``values`` (str or UTF-8 bytes) as an object array of str; `InvalidEmbeddingError` naming ``name``
    and the first row that is not valid UTF-8 (undecodable bytes, a lone surrogate)."""
    import pyarrow as pa

    out = list(values)
    for row, v in enumerate(out):
        if isinstance(v, bytes):
            try:
                out[row] = v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidEmbeddingError(f"{name} row {row} is {v[:40]!r}, not valid UTF-8 ({exc.reason} at "
                                            f"byte {exc.start})") from None
    try:  # one pass in C; the slow scan below runs only to name the offending row
        pa.array(out, type=pa.string())
    except (UnicodeEncodeError, pa.ArrowException):
        for row, v in enumerate(out):
            if v is None and allow_none:
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidEmbeddingError(f"{name} row {row} is {v[:40]!r}, which UTF-8 cannot encode "
                                            f"({exc.reason} at position {exc.start})") from None
        raise
    return np.asarray(out, dtype=object)


def _object_column(arr: np.ndarray, name: str) -> np.ndarray:
    """An object (Python values) metadata column as strings (object array, None allowed) or numbers;
    `InvalidEmbeddingError` naming the column and the first row whose type differs from the others."""
    values = arr.tolist()
    kinds = [None if v is None else str if isinstance(v, (str, bytes)) else bool if isinstance(v, (bool, np.bool_))
             else int if isinstance(v, (int, np.integer)) else float if isinstance(v, (float, np.floating))
             else type(v) for v in values]
    present = [k for k in kinds if k is not None]
    first = present[0] if present else str
    allowed = {int, float} if first in (int, float) else {first}
    for row, k in enumerate(kinds):
        if k is not None and k not in (str, bool, int, float):
            raise InvalidEmbeddingError(
                f"metadata[{name!r}] row {row} is {values[row]!r} ({type(values[row]).__name__}); a metadata "
                "column holds strings or numbers (bool, int, float), one type per column")
        if k is not None and k not in allowed:
            raise InvalidEmbeddingError(
                f"metadata[{name!r}] row {row} is {values[row]!r} ({type(values[row]).__name__}), but the column "
                f"holds {first.__name__} values; a metadata column must hold one type (strings or numbers)")
    if first is str:
        return utf8_strings(values, f"metadata[{name!r}]", allow_none=True)
    if None in kinds:
        row = kinds.index(None)
        raise InvalidEmbeddingError(f"metadata[{name!r}] row {row} is None in a numeric column")
    if first is bool:
        return np.asarray(values, dtype=bool)
    if float in present:
        return np.asarray(values, dtype=np.float64)
    for row, v in enumerate(values):
        if not _I64_MIN <= int(v) <= _I64_MAX:
            raise InvalidEmbeddingError(f"metadata[{name!r}] row {row} is {v!r}, outside int64")
    return np.asarray(values, dtype=np.int64)


def _unmasked(values: np.ma.MaskedArray, name: str) -> np.ndarray:
    """A masked column as a plain one, masked entries as the nulls its type has: NaN (floats), None
    (strings), NaT (times); any other masked column is refused (as an Arrow table's nulls are)."""
    mask = np.ma.getmaskarray(values)
    if not mask.any():
        return np.ma.getdata(values)
    kind = values.dtype.kind
    if kind == "f":
        return values.filled(np.nan)
    if kind in "mM":
        return values.filled(values.dtype.type("NaT"))
    if kind in "USO":
        out = np.asarray(values.data, dtype=object).copy()
        out[mask] = None
        return out
    row = int(np.argmax(mask.reshape(-1)))
    raise InvalidEmbeddingError(f"metadata[{name!r}] row {row} is masked in a {values.dtype} column; only float "
                                "(NaN), string (None) and time (NaT) columns take nulls")


def _nullable(values: Any) -> bool:
    """Whether ``values`` is a pyarrow, pandas or other Arrow-exporting column (a Polars Series): each
    may hold nulls numpy cannot."""
    if isinstance(values, np.ndarray):
        return False
    mod = type(values).__module__
    return (mod.startswith("pyarrow") or mod.startswith("pandas") or hasattr(values, "__arrow_c_array__")
            or hasattr(values, "__arrow_c_stream__"))


def _arrow(values: Any, name: str) -> Any:
    """The column as a pyarrow array (pandas' NA, None and NaN become nulls; a big-endian pandas
    column is made native first, as Arrow takes native byte order only)."""
    import pyarrow as pa

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    try:
        if type(values).__module__.startswith("pandas"):
            dtype = getattr(values, "dtype", None)
            if isinstance(dtype, np.dtype) and not dtype.isnative:
                values = values.astype(dtype.newbyteorder("="))
            return pa.array(values, from_pandas=True)
        if hasattr(values, "__arrow_c_array__"):
            return pa.array(values)
        return pa.chunked_array(values)  # (an __arrow_c_stream__ exporter: a Polars Series)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InvalidEmbeddingError(f"metadata[{name!r}] could not be read as a column: {exc}") from exc


_TIME_UNITS = {"M": ("D", "s", "ms", "us", "ns"), "m": ("s", "ms", "us", "ns")}  # Arrow's date32, timestamp, duration


def metadata_columns(metadata: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    """User columns as 1-D arrays of length n (numeric or string); names must not be reserved
    (`m2m.lake.schema.RESERVED_COLUMNS`)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidEmbeddingError(f"metadata must be a dict of column name -> [n] array, got {type(metadata)}")
    out: dict[str, np.ndarray] = {}
    for name, values in metadata.items():
        if not isinstance(name, str) or not name:
            raise InvalidEmbeddingError(f"metadata column names must be non-empty strings, got {name!r}")
        why = reserved_reason(name)
        if why is not None:
            raise InvalidEmbeddingError(f"metadata column {name!r} clashes with a reserved name: {why}")
        if isinstance(values, (list, tuple)) and values:  # numpy would turn [1, "a", 2.5] into strings, silently
            kinds = [isinstance(v, (str, bytes)) for v in values if v is not None]
            if kinds and any(k != kinds[0] for k in kinds):
                i, v = next((i, v) for i, v in enumerate(values)
                            if v is not None and isinstance(v, (str, bytes)) != kinds[0])
                raise InvalidEmbeddingError(f"metadata[{name!r}] row {i} is {v!r}; a metadata column holds all "
                                            "numbers or all strings")
        if isinstance(values, np.ma.MaskedArray):
            values = _unmasked(values, name)
        elif _nullable(values):
            # an Arrow or pandas column: its nulls follow the Arrow table's rules (np.asarray turned a
            # nullable int column into float64 NaNs, rounding ints beyond 2**53)
            from m2m.lake.arrow_input import arrow_metadata

            values = arrow_metadata(_arrow(values, name), name, "add_splats")
        arr = as_numpy(values, f"metadata[{name!r}]")
        if arr.dtype.kind in "biufmM" and not arr.dtype.isnative:  # Arrow takes native byte order only
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.ndim != 1 or arr.shape[0] != n:
            raise InvalidEmbeddingError(
                f"metadata[{name!r}] must have shape [{n}] to match vectors, got {tuple(arr.shape)}")
        if arr.dtype.kind in ("U", "S"):
            arr = utf8_strings(arr.tolist(), f"metadata[{name!r}]")
        elif arr.dtype == object:
            arr = _object_column(arr, name)
        elif arr.dtype.kind not in "biufmM":  # complex, structured, ...: nothing a column type holds
            raise InvalidEmbeddingError(
                f"metadata[{name!r}] has dtype {arr.dtype} (row 0 is {arr[0]!r}); a metadata column holds "
                "numbers (bool, int, uint, float) or strings" if n else
                f"metadata[{name!r}] has dtype {arr.dtype}; a metadata column holds numbers or strings")
        elif arr.dtype.kind == "f" and arr.dtype.itemsize > 8:  # Arrow has no float wider than 64 bits
            raise InvalidEmbeddingError(
                f"metadata[{name!r}] has dtype {arr.dtype} (long double): Arrow stores floats of 16, 32 or 64 "
                "bits only; convert it, e.g. values.astype('float64')")
        elif arr.dtype.kind in "mM" and np.datetime_data(arr.dtype)[0] not in _TIME_UNITS[arr.dtype.kind]:
            # Arrow has no such unit (pyarrow: "Unsupported datetime64 time unit")
            units = ", ".join(_TIME_UNITS[arr.dtype.kind])
            raise InvalidEmbeddingError(
                f"metadata[{name!r}] has dtype {arr.dtype}: Arrow stores {arr.dtype.kind == 'M' and 'datetime64' or 'timedelta64'} "
                f"in units {units} only; convert it, e.g. values.astype('{arr.dtype.str[1:].split('[')[0]}[s]')")
        elif arr.dtype == np.uint64:
            big = arr > np.uint64(_I64_MAX)
            if big.any():
                row = int(np.argmax(big))
                raise InvalidEmbeddingError(
                    f"metadata[{name!r}] row {row} is {int(arr[row])}, above 2**63 - 1: a uint64 column must fit "
                    "in int64 (streams deliver it as int64); store it as a string or split it")
        out[name] = arr
    return out


@dataclass(frozen=True)
class SplatBatch:
    """Validated input of one ``add_splats`` call (mu not yet normalised: chunks are normalised on write,
    `unit_rows`, unless ``norms`` is given)."""

    vectors: np.ndarray
    labels: np.ndarray | None
    kappa: np.ndarray
    alpha: np.ndarray
    metadata: dict[str, np.ndarray]
    ids: np.ndarray | None = None  # explicit ids (consolidation keeps ids); None = assign new ones
    norms: np.ndarray | None = None  # given with stored unit vectors (consolidation): written as they are
    start: int = 0  # the input row of the batch's first row (chunked ingest), for messages

    @property
    def rows(self) -> int:
        return int(self.vectors.shape[0])


def validate_splats(vectors: Any, labels: Any, kappa: Any, alpha: Any, metadata: Any, dim: int,
                    start: int = 0, kappa_nan: bool = False) -> SplatBatch:
    """Validate one ``add_splats`` call completely, raising `InvalidEmbeddingError` on the first problem.

    ``start`` offsets the row numbers in error messages (for chunked ingest); ``kappa_nan``: the kappa
    column is an m2m export's own: NaN is a row without an estimate, 0 an estimate of a neighbourhood no
    tighter than chance (docs/geometry.md), not invalid values.
    """
    arr = as_vectors(vectors, dim)
    check_rows(arr, start)
    with in_chunk(start):
        return dataclasses.replace(_columns(arr, labels, kappa, alpha, metadata, kappa_nan), start=start)



def _columns(arr: np.ndarray, labels: Any, kappa: Any, alpha: Any, metadata: Any, kappa_nan: bool) -> SplatBatch:
    n = arr.shape[0]
    lab = None if labels is None else label_column(labels, n)
    kap = (np.full(n, np.nan, dtype=np.float32) if kappa is None
           else positive_column(kappa, n, "kappa", allow_nan=kappa_nan, allow_zero=kappa_nan))
    alp = np.ones(n, dtype=np.float32) if alpha is None else positive_column(alpha, n, "alpha")
    meta = metadata_columns(metadata, n)
    return SplatBatch(arr, lab, kap, alp, meta)


def decode_codes(vocabulary: Sequence[str], codes: Any, whose: str = "the") -> np.ndarray:
    """``vocabulary[codes]`` as an object array (streamed string-label codes back to their strings);
    `ConfigError` for codes that are not integers (floats were truncated, bools and '1' taken) or lie
    outside ``whose`` vocabulary."""
    arr = as_numpy(codes, "codes")
    big = beyond_int64(arr)
    problem = integer_problem(arr) or (None if big is None else f"{big} (beyond int64)")
    if problem is not None:
        raise ConfigError(f"label codes must be integers, got {problem}")
    arr = arr.astype(np.int64, copy=False)
    vocab = np.asarray(vocabulary, dtype=object)
    bad = (arr < 0) | (arr >= len(vocab))
    if bad.any():
        raise ConfigError(f"label code {int(arr[bad][0])} is outside {whose} vocabulary of {len(vocab)} labels")
    return vocab[arr]
