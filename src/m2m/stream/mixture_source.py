"""The row source of a mixture: several lakes' pinned snapshots, one after the other.

`MixtureSource` concatenates the shards of its parts (lake ``j``'s rows are global rows
``bases[j]:bases[j + 1]``), so the importance plan of a mixture (`m2m.stream.mixing.MixtureSampler`)
is a plan of global rows that the one pipeline orders, shards and resumes as for one lake. It adds
the ``source`` column (the lake's index in the mixture). Its reader (`open_reader`, which
`m2m.stream.pipeline.Resources` asks a source for when it has one) is a `MixedReader`: one
`ColdReader` per part, so each lake keeps its own positional, checked reads and, for a remote lake,
its own node cache, whether the other parts are local or remote.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from m2m.errors import ConfigError
from m2m.stream.columns import torch_dtype
from m2m.stream.source import ComputedGeometry, FileBackedSource, PinnedSnapshot, RowSource, file_backed
from m2m.stream.stages.cold import ColdReader

#: The column a mixture adds: the index of each row's lake in ``Mixture.names``.
SOURCE = "source"


class MixtureSource:
    """A `RowSource` over ``parts`` (same ``dim`` and ``mu`` storage dtype), their shards concatenated."""

    def __init__(self, parts: Sequence[RowSource]) -> None:
        if not parts:
            raise ConfigError("mix: no lakes given")
        self.parts = list(parts)
        sizes = [int(p.num_rows) for p in self.parts]
        self.bases = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        counts = [len(p.shard_offsets) - 1 for p in self.parts]
        self.shard_bases = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        offsets = [np.asarray(p.shard_offsets[:-1], dtype=np.int64) + b for p, b in zip(self.parts, self.bases)]
        self._offsets = np.concatenate([*offsets, [self.bases[-1]]]).astype(np.int64)
        # a lake's own column named "source" is shadowed by the mixture's (`Mixture` warns of it)
        common = [n for n in self.parts[0].column_names if n != SOURCE and all(n in p.column_names for p in self.parts[1:])]
        self._columns = (*common, SOURCE)
        self._dtypes: dict[str, np.dtype] = {}

    def part_dtype(self, j: int, name: str) -> np.dtype | None:
        """The dtype part ``j`` reads column ``name`` as (None: not described without a read)."""
        sample = self.parts[j].column_sample(name)
        return None if sample is None else sample.dtype

    def dtype_of(self, name: str) -> np.dtype | None:
        """The dtype the mixture reads column ``name`` as: the parts' common one (int32 and int64 metadata
        read as int64, float32 and float64 as float64; `Mixture` lets only columns delivered alike mix),
        each part's values cast to it."""
        if name not in self._dtypes:
            got = [d for j in range(len(self.parts)) if (d := self.part_dtype(j, name)) is not None]
            if not got:
                return None
            self._dtypes[name] = np.result_type(*got)
        return self._dtypes[name]

    @property
    def num_rows(self) -> int:
        return int(self.bases[-1])

    @property
    def snapshot_key(self) -> str | None:
        """The parts' snapshot keys (`m2m.lake.reader.Snapshot.snapshot_key`), None if a part has none."""
        keys = [p.snapshot_key if isinstance(p, PinnedSnapshot) else None for p in self.parts]
        return None if any(k is None for k in keys) else ",".join(str(k) for k in keys)

    @property
    def geometry_key(self) -> str | None:
        """The parts' in-memory geometry keys (`m2m.stream.from_lake.Geometry.key`), None if none has one."""
        keys = [p.geometry_key if isinstance(p, ComputedGeometry) else None for p in self.parts]
        return None if all(k is None for k in keys) else "; ".join(f"lake {i}: {k or 'stored'}"
                                                                    for i, k in enumerate(keys))

    @property
    def dim(self) -> int:
        return int(self.parts[0].dim)

    @property
    def storage_dtype(self) -> np.dtype:
        return self.parts[0].storage_dtype

    @property
    def shard_offsets(self) -> np.ndarray:
        return self._offsets

    @property
    def column_names(self) -> Sequence[str]:
        return self._columns

    def part_of_shard(self, shard: int) -> tuple[int, int]:
        """(part index, shard within that part) of global shard ``shard``."""
        j = int(np.searchsorted(self.shard_bases, shard, side="right")) - 1
        return j, int(shard - self.shard_bases[j])

    def part_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The part index of each global row."""
        return np.searchsorted(self.bases, rows, side="right") - 1

    def column(self, shard: int, name: str) -> np.ndarray:
        j, local = self.part_of_shard(shard)
        if name == SOURCE:
            return np.full(int(self._offsets[shard + 1] - self._offsets[shard]), j, dtype=np.int64)
        values = self.parts[j].column(local, name)
        common = self.dtype_of(name)
        return values if common is None else values.astype(common, copy=False)

    def column_sample(self, name: str) -> np.ndarray | None:
        if name == SOURCE:
            return np.zeros(0, dtype=np.int64)
        sample = self.parts[0].column_sample(name)
        common = self.dtype_of(name)
        return sample if sample is None or common is None else sample.astype(common)

    def open_reader(self, names: Sequence[str]) -> "MixedReader":
        """The reader the stream's stages use for ``names`` (see `m2m.stream.pipeline.Resources.reader`)."""
        return MixedReader(self, names)

    def _remote_parts(self) -> list[tuple[int, FileBackedSource]]:
        """(index, part) of the parts read through a node cache."""
        return [(j, f) for j, f in enumerate(map(file_backed, self.parts)) if f is not None and f.is_remote]

    @property
    def is_remote(self) -> bool:
        """Whether any part comes through a node cache (then `plan_prefetch` downloads ahead)."""
        return bool(self._remote_parts())

    def plan_prefetch(self, shards: Sequence[int]) -> None:
        """Global ``shards`` in the order a stream first reads them: each remote part gets its own
        shards in that order (its node cache then downloads ahead as for one lake)."""
        order = np.asarray(list(shards), dtype=np.int64)
        part = np.searchsorted(self.shard_bases, order, side="right") - 1
        for j, f in self._remote_parts():
            f.plan_prefetch((order[part == j] - self.shard_bases[j]).tolist())

    def fetch_stats(self) -> dict[str, Any] | None:
        """The node-cache downloads of this process, summed over the remote parts (None: none is remote)."""
        stats: list[dict[str, Any]] = []
        for _, f in self._remote_parts():
            got = f.fetch_stats()
            if got:
                stats.append(got)
        if not stats:
            return None
        out: dict[str, Any] = {}
        for s in stats:
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        return out


class MixedReader:
    """The `ColdReader` interface over a `MixtureSource`: each global range or gather is split by part
    and served by that part's own `ColdReader`; ``source`` is computed from the row positions."""

    def __init__(self, source: MixtureSource, names: Sequence[str]) -> None:
        self.source = source
        self.offsets = source.shard_offsets
        self.num_rows = source.num_rows
        self.bases = source.bases
        stored = [n for n in names if n != SOURCE]
        self.readers = [ColdReader(p, stored) for p in source.parts]
        # the columns a part reads as another dtype than the mixture's: read into a buffer of its own, cast
        self._cast = [{n: d for n in stored if (d := source.part_dtype(j, n)) is not None
                       and d != source.dtype_of(n)} for j in range(len(source.parts))]
        self._advised: set[tuple[int, int]] = set()
        self._arena: Any = None

    @property
    def positional(self) -> bool:
        return any(r.positional for r in self.readers)

    def bytes_checked(self) -> int:
        return sum(r.bytes_checked() for r in self.readers)

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def for_scattered_reads(self, arena: Any = None) -> "MixedReader":
        """As `ColdReader.for_scattered_reads`: a whole-mixture warm arena serves scattered rows."""
        self._arena = arena if arena is not None and arena.whole else None
        for r in self.readers:
            r.for_scattered_reads(None)
        return self

    def _spans(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(part, global start, global end) of the parts ``[lo, hi)`` overlaps."""
        out = []
        first = int(np.searchsorted(self.bases, lo, side="right")) - 1
        for j in range(max(first, 0), len(self.readers)):
            a, b = max(lo, int(self.bases[j])), min(hi, int(self.bases[j + 1]))
            if a >= hi:
                break
            if b > a:
                out.append((j, a, b))
        return out

    def read_rows(self, name: str, lo: int, hi: int, dst: np.ndarray, fresh: bool = True) -> int:
        """Copy global rows ``[lo, hi)`` of ``name`` into ``dst``; returns bytes (``fresh``: as `ColdReader`)."""
        for j, a, b in self._spans(lo, hi):
            out = dst[a - lo: b - lo]
            if name == SOURCE:
                out[...] = j
            else:
                base = int(self.bases[j])
                own = self._cast[j].get(name)
                if own is None:
                    self.readers[j].read_rows(name, a - base, b - base, out, fresh)
                else:
                    tmp = np.empty(out.shape, dtype=own)
                    self.readers[j].read_rows(name, a - base, b - base, tmp, fresh)
                    out[...] = tmp
        return int(dst[: hi - lo].nbytes)

    def willneed(self, lo: int, hi: int) -> None:
        for j, a, b in self._spans(lo, hi):
            base = int(self.bases[j])
            self.readers[j].willneed(a - base, b - base)

    def advise_all(self) -> None:
        for r in self.readers:
            r.advise_all()

    def advise_blocks(self, blocks: np.ndarray, block_rows: int) -> None:
        for b in blocks.tolist():
            if (b, block_rows) in self._advised:
                continue
            self._advised.add((b, block_rows))
            self.willneed(b * block_rows, min((b + 1) * block_rows, self.num_rows))

    def forget_advice(self, block: int | None = None, block_rows: int = 0) -> None:
        if block is None:
            self._advised.clear()
        else:
            self._advised.discard((block, block_rows))

    def gather(self, name: str, rows: np.ndarray, dst: torch.Tensor) -> int:
        """``dst[i] = name[rows[i]]``; returns bytes read."""
        if self._arena is not None:
            return int(self._arena.gather_whole(name, rows, dst))
        part = self.source.part_of_rows(rows)
        if name == SOURCE:
            dst.copy_(torch.from_numpy(part.astype(np.int64, copy=False)))
            return int(dst.nbytes)
        for j in np.unique(part).tolist():
            sel = np.flatnonzero(part == j)
            own = self._cast[j].get(name)
            if len(sel) == len(rows) and own is None:  # one lake only: straight into dst
                return self.readers[j].gather(name, rows - self.bases[j], dst)
            tmp = torch.empty((len(sel), *dst.shape[1:]), dtype=dst.dtype if own is None else torch_dtype(own))
            self.readers[j].gather(name, rows[sel] - self.bases[j], tmp)
            dst.index_copy_(0, torch.from_numpy(sel), tmp.to(dst.dtype))
        return int(dst.nbytes)
