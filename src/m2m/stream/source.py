"""The read-only row source a stream gathers from: shards of columns, memory-mapped or in RAM."""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from m2m.errors import ConfigError


@runtime_checkable
class RowSource(Protocol):
    """A pinned, immutable set of rows split into shards.

    ``shard_offsets`` has ``num_shards + 1`` entries; shard ``s`` holds global rows
    ``shard_offsets[s] : shard_offsets[s + 1]``. ``column(s, name)`` returns a numpy array for
    shard ``s`` without copying when the storage allows it (``mu`` is ``[rows, dim]`` of the storage
    dtype, every other column is ``[rows]`` or ``[rows, k]``).

    A source backed by files may also have ``column_extent(shard, name)`` returning where a
    column lies in a file (`m2m.lake.shard.ColumnExtent`, or None): the stream then reads it with
    positional, checksum-checked reads instead of through ``column`` (see `m2m.lake.reader.Snapshot`).
    A source made of other sources may have ``open_reader(names)`` returning the reader the stream's
    stages use instead of a `m2m.stream.stages.cold.ColdReader` over it (`m2m.stream.mixture_source`).
    """

    @property
    def num_rows(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def storage_dtype(self) -> np.dtype: ...

    @property
    def shard_offsets(self) -> np.ndarray: ...

    @property
    def column_names(self) -> Sequence[str]: ...

    def column(self, shard: int, name: str) -> np.ndarray: ...

    def column_sample(self, name: str) -> np.ndarray | None:
        """An empty array with the dtype and trailing shape ``column(s, name)`` gives, when the source
        knows it without reading a shard (a lake: from its manifest); None: the stream reads one."""
        ...


@runtime_checkable
class FileBackedSource(RowSource, Protocol):
    """A `RowSource` whose columns lie in shard files (a lake snapshot): what the stream may ask of it.

    ``column_extent(shard, name)``: where a fixed-width column lies in its file (a
    `m2m.lake.shard.ColumnExtent`, or None: read it through ``column``); ``fs``: the lake's file
    system (``is_local``, ``open_local``); ``is_remote``: shards come through the node cache;
    ``open_bytes_limit``: most bytes of shard files to keep open at once (None: no limit);
    ``plan_prefetch(shards)``: the order a stream will first read shards in (download ahead);
    ``prefetch_shards(shards)``: start downloading these shards now (returns how many were queued);
    ``fetch_stats()``: this process's node-cache downloads (None for local lakes).
    """

    fs: Any

    @property
    def is_remote(self) -> bool: ...

    @property
    def open_bytes_limit(self) -> int | None: ...

    def column_extent(self, shard: int, name: str) -> Any: ...

    def plan_prefetch(self, shards: Sequence[int]) -> None: ...

    def prefetch_shards(self, shards: Sequence[int]) -> int: ...

    def fetch_stats(self) -> dict[str, Any] | None: ...


@runtime_checkable
class PrefetchPlanning(Protocol):
    """A source that downloads shards ahead of a stream in the order it will first read them: a remote
    lake snapshot, or a mixture with a remote lake (``plan_prefetch`` takes the source's own shard
    indices)."""

    @property
    def is_remote(self) -> bool: ...

    def plan_prefetch(self, shards: Sequence[int]) -> None: ...


@runtime_checkable
class FetchReporting(Protocol):
    """A source that counts its node-cache downloads: a lake snapshot, or a mixture of lakes."""

    def fetch_stats(self) -> dict[str, Any] | None: ...


@runtime_checkable
class CompositeSource(Protocol):
    """A source made of others (a mixture of lakes): it opens the reader that reads each part."""

    def open_reader(self, names: Sequence[str]) -> Any: ...


@runtime_checkable
class ComputedGeometry(Protocol):
    """A source whose kappa/neighbours were computed in memory for the stream (a lake snapshot without
    stored geometry, or a mixture with one): ``geometry_key`` says how (``"k=16,seed=0"``), None when
    nothing was computed; stream states record it (a mid-epoch state resumes the same geometry only)."""

    @property
    def geometry_key(self) -> str | None: ...


@runtime_checkable
class PinnedSnapshot(Protocol):
    """A source that reads committed lake versions: ``snapshot_key`` names them with their commit times
    (`m2m.lake.reader.Snapshot.snapshot_key`); stream states record it (a mid-epoch state resumes the
    same versions only)."""

    @property
    def snapshot_key(self) -> str: ...


def file_backed(source: RowSource) -> FileBackedSource | None:
    """``source`` as a `FileBackedSource`, or None for an in-memory source."""
    return source if isinstance(source, FileBackedSource) else None


class ArraySource:
    """A `RowSource` over in-memory numpy arrays, split into shards of ``shard_rows`` rows."""

    def __init__(self, columns: dict[str, np.ndarray], shard_rows: int | None = None) -> None:
        if "mu" not in columns:
            raise ConfigError("ArraySource needs a 'mu' column")
        mu = columns["mu"]
        if mu.ndim != 2:
            raise ConfigError(f"'mu' must be 2-D, got shape {mu.shape}")
        n = mu.shape[0]
        for name, col in columns.items():
            if len(col) != n:
                raise ConfigError(f"column {name!r} has {len(col)} rows, 'mu' has {n}")
        self._columns = columns
        step = n if not shard_rows else int(shard_rows)
        bounds = list(range(0, n, max(step, 1))) + [n]
        self._offsets = np.asarray(sorted(set(bounds)), dtype=np.int64)

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    @property
    def dim(self) -> int:
        return int(self._columns["mu"].shape[1])

    @property
    def storage_dtype(self) -> np.dtype:
        return self._columns["mu"].dtype

    @property
    def shard_offsets(self) -> np.ndarray:
        return self._offsets

    @property
    def column_names(self) -> Sequence[str]:
        return tuple(self._columns)

    def column(self, shard: int, name: str) -> np.ndarray:
        lo, hi = self._offsets[shard], self._offsets[shard + 1]
        return self._columns[name][lo:hi]

    def column_sample(self, name: str) -> np.ndarray | None:
        col = self._columns.get(name)
        return None if col is None else col[:0]
