"""The one registry of column names m2m itself uses: user metadata may not take any of them.

Every column a shard file, a sidecar or a streamed batch can carry is named here, so a metadata
column can never be shadowed by (or shadow) one of m2m's own: ``tests/lake/test_schema.py`` checks
that every column a real lake, its geometry sidecars and its stream produce is in
`RESERVED_COLUMNS`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ID = "id"                    # int64, ascending and unique within a version
MU = "mu"                    # fixed_size_list<float32|float16>[dim], unit vectors
KAPPA = "kappa"              # float32 concentration (NaN until estimated)
ALPHA = "alpha"              # float32 mass
LABEL = "label"              # int64 or string
MU_NORM = "mu_norm"          # float64: each row's norm as given (input = mu * mu_norm); absent in older shards
NEIGHBORS = "neighbors"      # geometry sidecar: fixed_size_list<int64>[k] neighbour ids (-1: none)
NEIGHBOR_COS = "neighbor_cos"  # geometry sidecar: fixed_size_list<float32>[k] their cosines
# geometry sidecar, optional (written since 2026-12-05 by the local engine): each neighbour's kappa and
# alpha and whether it has the row's label, copied from the neighbour's row when the sidecars are
# written, so a process can build a row's augmentation terms from that row's shard alone
NEIGHBOR_KAPPA = "neighbor_kappa"  # fixed_size_list<float32>[k]
NEIGHBOR_ALPHA = "neighbor_alpha"  # fixed_size_list<float32>[k]
NEIGHBOR_SAME_LABEL = "neighbor_same_label"  # fixed_size_list<bool>[k] (lakes with labels only)
EMBEDDING = "embedding"      # stream batches: the (possibly augmented) vectors
WEIGHT = "weight"            # stream batches: importance weights
ROWS = "_rows"               # stream batches: global row positions (internal)

MAIN_COLUMNS = (ID, MU, KAPPA, ALPHA)            # every shard's first file holds these (and label, metadata)
OPTIONAL_MAIN_COLUMNS = (MU_NORM,)               # a shard's first file may hold these (older shards do not)
GEOMETRY_COLUMNS = (KAPPA, NEIGHBORS, NEIGHBOR_COS)  # what estimate_kappa writes per shard
NEIGHBOUR_TERMS = (NEIGHBOR_KAPPA, NEIGHBOR_ALPHA, NEIGHBOR_SAME_LABEL)  # what it may write besides
STREAM_COLUMNS = (EMBEDDING, WEIGHT, ROWS)

RESERVED_COLUMNS = frozenset(MAIN_COLUMNS + OPTIONAL_MAIN_COLUMNS + (LABEL,) + GEOMETRY_COLUMNS + NEIGHBOUR_TERMS
                             + STREAM_COLUMNS)


def reserved_reason(name: str) -> str | None:
    """Why ``name`` cannot be a user metadata column, or None when it can."""
    if name in RESERVED_COLUMNS:
        return f"{name!r} is one of m2m's own columns ({', '.join(sorted(RESERVED_COLUMNS))})"
    return None


# Unsigned metadata columns are stored as given; a stream delivers them as the signed type that holds
# every value (torch gathers no uint16/32/64). uint64 holds only values below 2**63 (ingest refuses others).
WIDENED = {"uint16": "int32", "uint32": "int64", "uint64": "int64"}


def read_in_memory(type_name: str | None) -> bool:
    """Whether a stream reads a metadata column of Arrow type ``type_name`` through memory rather than
    straight from its file's bytes: a widened unsigned int, or a date (``date32[day]``: 4-byte days on
    disk, int64 days in a stream, like a timestamp's int64 counts)."""
    return type_name is not None and (type_name in WIDENED or type_name.startswith("date"))


def widened_dtype(dtype: "np.dtype[Any]") -> "np.dtype[Any]":
    """The dtype a stream reads a stored column as (``dtype`` itself unless it is in `WIDENED`)."""
    wide = WIDENED.get(dtype.name)
    return dtype if wide is None else np.dtype(wide)


def read_dtype(type_name: str) -> "np.dtype[Any] | None":
    """The dtype `m2m.lake.reader.Snapshot.column` returns for a metadata column of Arrow type
    ``type_name`` (as the manifest records it), or None when the name alone does not say: timestamps,
    dates and durations read as int64 counts, unsigned ints as `widened_dtype`, strings as objects."""
    import pyarrow as pa

    try:
        t = pa.type_for_alias(type_name)
    except (ValueError, KeyError, TypeError):
        return None
    if pa.types.is_temporal(t):
        return np.dtype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.dtype(object)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        return None
    return widened_dtype(np.dtype(t.to_pandas_dtype()))
