"""Input Arrow columns read as numpy the way ``add_splats(metadata={...})`` takes them (used by the
file ingest, ``add_splats`` given Arrow or pandas columns, and the Ray ingest)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from m2m.errors import InvalidEmbeddingError

__all__ = ["arrow_metadata", "plain"]


def plain(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One array with dictionaries decoded and large or view strings as strings."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):  # e.g. partition keys of a dataset, a Polars Categorical
        values = arr.type.value_type
        if pa.types.is_large_string(values) or pa.types.is_string_view(values):
            # Polars sends dictionary<uint32, string_view>: Arrow has no take kernel for string_view
            # (decoding it first raised ArrowNotImplementedError at the user), so cast the dictionary first
            arr = arr.cast(pa.dictionary(arr.type.index_type, pa.string()))
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):  # e.g. from Polars
        arr = arr.cast(pa.string())
    return arr


def arrow_metadata(arr: pa.Array | pa.ChunkedArray, name: str, where: Any) -> np.ndarray:
    """A metadata column of an input table as numpy, taking what ``add_splats(metadata={...})`` takes:
    numbers, booleans, strings (nulls allowed), dates, timestamps and durations (naive, units s..ns)."""
    arr = plain(arr)
    typ = arr.type
    string = pa.types.is_string(typ) or pa.types.is_large_string(typ)
    temporal = pa.types.is_timestamp(typ) or pa.types.is_duration(typ) or pa.types.is_date(typ)
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ) or string or temporal):
        raise InvalidEmbeddingError(f"{where}: metadata column {name!r} has type {typ}; "
                                    "numbers, booleans, strings, dates, timestamps and durations are supported")
    if pa.types.is_timestamp(typ) and typ.tz is not None:
        raise InvalidEmbeddingError(f"{where}: metadata column {name!r} has type {typ}: timestamps are stored "
                                    f"without a time zone; cast it first, e.g. to timestamp[{typ.unit}] in UTC")
    if arr.null_count and not (pa.types.is_floating(typ) or string or temporal):
        row = arr.is_null().to_numpy(zero_copy_only=False).argmax()
        raise InvalidEmbeddingError(f"{where}: metadata column {name!r} has {arr.null_count} null rows "
                                    f"(row {row} is the first); only float (NaN), string and time (NaT) columns "
                                    "take nulls")
    if pa.types.is_date64(typ):  # milliseconds since the epoch: the date of each, as date32 stores it
        return arr.to_numpy(zero_copy_only=False).astype("datetime64[D]")
    return arr.to_numpy(zero_copy_only=False)
