"""Turn validated splats into shard files and the manifest fields that describe them."""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

from m2m._validate import SplatBatch, unit_rows
from m2m.errors import InvalidEmbeddingError, in_chunk
from m2m.lake.fs import LakeFS
from m2m.lake.integrity import WriteStamp
from m2m.lake.manifest import Manifest, ShardEntry
from m2m.lake.schema import MU_NORM
from m2m.lake.shard import write_shard_file

logger = logging.getLogger(__name__)

_ROW_OVERHEAD = 8 + 4 + 4 + 8 + 8  # id, kappa, alpha, label, mu_norm


def shard_rows(dim: int, dtype: str, shard_bytes: int) -> int:
    """Rows per shard so that a shard file is about ``shard_bytes``."""
    itemsize = np.dtype(dtype).itemsize
    return max(1, shard_bytes // (dim * itemsize + _ROW_OVERHEAD))


@dataclass(frozen=True)
class SchemaUpdate:
    """Label type, vocabulary and metadata types of the lake after an append."""

    label_type: str | None
    label_vocabulary: tuple[str, ...]
    metadata: dict[str, str]
    defined: bool = True

    @staticmethod
    def of(base: Manifest) -> "SchemaUpdate":
        defined = base.rows > 0 or base.label_type is not None or bool(base.metadata)
        return SchemaUpdate(base.label_type, base.label_vocabulary, dict(base.metadata), defined)


def reconcile_schema(schema: SchemaUpdate, batch: SplatBatch) -> SchemaUpdate:
    """Check a batch's labels and metadata against the schema so far (the first batch defines it)."""
    label_type = None
    if batch.labels is not None:
        label_type = "string" if batch.labels.dtype == object else "int64"
    if schema.defined:
        if label_type != schema.label_type:
            have = "no labels" if schema.label_type is None else f"{schema.label_type} labels"
            got = "no labels" if label_type is None else f"{label_type} labels"
            raise InvalidEmbeddingError(f"the lake holds {have}; this call gives {got}")
        if set(batch.metadata) != set(schema.metadata):
            raise InvalidEmbeddingError(
                f"metadata columns {sorted(batch.metadata)} differ from the lake's {sorted(schema.metadata)}")
    metadata = dict(schema.metadata)
    for name, values in batch.metadata.items():
        typ = pa.string() if values.dtype == object else pa.from_numpy_dtype(values.dtype)
        if name in metadata and str(typ) != metadata[name]:
            with in_chunk(batch.start):
                check_cast(name, values, pa.type_for_alias(metadata[name]))
        metadata.setdefault(name, str(typ))
    vocab = schema.label_vocabulary
    if label_type == "string":
        assert batch.labels is not None  # a string label type comes from this batch's labels
        known = set(vocab)
        vocab = vocab + tuple(v for v in dict.fromkeys(batch.labels.tolist()) if v not in known)
    return SchemaUpdate(label_type, vocab, metadata, True)


def _kind(t: pa.DataType) -> str:
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "time"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return str(t)  # bool, durations, ...: only their own type


def check_cast(name: str, values: np.ndarray, target: pa.DataType) -> None:
    """Refuse metadata ``values`` for a lake column of type ``target`` unless every value is stored as
    given: the same kind of type (numbers, times, strings; bool and durations only as themselves), no
    value out of range, and a value read back equal to the one given (a float column may round, but a
    finite value may not become inf). Observed before, with the first value alone checked and the
    column then cast by Arrow: ints stored in a bool column as True, 1e6 in a float16 column as inf,
    a time of day dropped by a date column, ints turned into strings."""
    given = pa.array(values.tolist() if values.dtype == object else values)
    where = f"metadata[{name!r}] has type {given.type}, the lake's column is {target}"
    if _kind(given.type) != _kind(target):
        raise InvalidEmbeddingError(where)
    refused: Exception | None = None
    try:
        stored = given.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        refused = exc
        try:  # the unchecked cast shows which row would change (Arrow's message names the value only)
            stored = given.cast(target, safe=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            raise InvalidEmbeddingError(f"{where}, and a value does not fit it: {' '.join(str(exc).split())}") from exc
    bad = _changed(given, stored, target)
    if bad.any():
        i = int(np.argmax(bad))
        why = (f"beyond {target}'s range" if pa.types.is_floating(target) and pa.types.is_floating(given.type) else
               f"convert the values to {target} yourself if that is meant")
        raise InvalidEmbeddingError(f"{where}, which would store row {i}'s {given[i].as_py()!r} as "
                                    f"{stored[i].as_py()!r} ({why})")
    # Arrow's own refusal stands where the comparison is not exact by itself (times, strings); for
    # numbers it is: Arrow also refuses ints a float holds exactly (2**25 into float32)
    if refused is not None and _kind(target) != "number":
        raise InvalidEmbeddingError(f"{where}, and a value does not fit it: {' '.join(str(refused).split())}")


def _changed(given: pa.Array, stored: pa.Array, target: pa.DataType) -> np.ndarray:
    """Rows of ``given`` that ``stored`` (its cast to ``target``, unchecked) does not hold as given. A
    float column may round a float (but a finite value may not become inf); every other value must
    read back equal: an int in a float column exactly, a negative int in an unsigned column not at all."""
    a = given.to_numpy(zero_copy_only=False)
    b = stored.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(target) and pa.types.is_floating(given.type):
        return np.isfinite(a.astype(np.float64)) & ~np.isfinite(b.astype(np.float64))
    if pa.types.is_floating(target) and pa.types.is_integer(given.type):
        b64 = b.astype(np.float64)   # exact: every float16/32/64 value is a float64
        info = np.iinfo(a.dtype)
        # float(info.max) + 1 is the first value beyond the range (2**63 for int64, where float(max) rounds up)
        fits = np.isfinite(b64) & (b64 >= float(info.min)) & (b64 < float(info.max) + 1.0)
        back = np.where(fits, b64, 0.0).astype(a.dtype)
        return ~fits | (back != a)
    if _kind(target) == "number":
        # numpy compares mixed int types by value (int8 -5 vs uint8 251: unequal), ints and floats as numbers
        return ~np.asarray(a == b, dtype=bool)
    try:
        back = stored.cast(given.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        back = stored.cast(given.type, safe=False)
    bad = ~np.asarray(back.to_numpy(zero_copy_only=False) == a, dtype=bool)
    if given.null_count:
        bad &= np.asarray(given.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    return bad


def rebase_schema(planned: SchemaUpdate, assumed: Manifest, base: Manifest) -> SchemaUpdate:
    """The planned schema moved onto ``base`` when a concurrent commit landed after validation."""
    if base.version == assumed.version:
        return planned
    now = SchemaUpdate.of(base)
    was = SchemaUpdate.of(assumed)
    if now.defined and was.defined and (now.label_type, now.metadata) != (was.label_type, was.metadata):
        raise InvalidEmbeddingError("the lake's schema was changed by a concurrent writer; validate again")
    if now.defined and not was.defined and (now.label_type, now.metadata) != (planned.label_type, planned.metadata):
        raise InvalidEmbeddingError("a concurrent writer defined another schema for this lake")
    known = set(now.label_vocabulary)
    extra = tuple(v for v in planned.label_vocabulary if v not in known)
    return SchemaUpdate(planned.label_type, now.label_vocabulary + extra, planned.metadata, True)


def _slice(b: SplatBatch, lo: int, hi: int) -> SplatBatch:
    return SplatBatch(b.vectors[lo:hi], None if b.labels is None else b.labels[lo:hi], b.kappa[lo:hi],
                      b.alpha[lo:hi], {k: v[lo:hi] for k, v in b.metadata.items()},
                      None if b.ids is None else b.ids[lo:hi], None if b.norms is None else b.norms[lo:hi])


STRING_BYTES_PER_SHARD = 1 << 30  # string data of one shard: Arrow's string arrays hold < 2 GiB each


def _string_columns(b: SplatBatch) -> dict[str, np.ndarray]:
    cols = {f"metadata[{k!r}]": v for k, v in b.metadata.items() if v.dtype == object}
    if b.labels is not None and b.labels.dtype == object:
        cols["labels"] = b.labels
    return cols


def _string_bytes(b: SplatBatch) -> np.ndarray | None:
    """Cumulative UTF-8 bytes of the batch's string values ([rows + 1], starting at 0), or None."""
    cols = _string_columns(b)
    if not cols:
        return None
    import pyarrow.compute as pc

    total = np.zeros(b.rows + 1, dtype=np.int64)
    for values in cols.values():
        lengths = pc.fill_null(pc.binary_length(pa.array(values, type=pa.large_string(), from_pandas=True)), 0)
        total[1:] += np.cumsum(lengths.to_numpy(zero_copy_only=False))
    return total


def _too_long(b: SplatBatch, row: int, seen: int) -> InvalidEmbeddingError:
    sizes = {name: len(str(v[row]).encode()) for name, v in _string_columns(b).items() if v[row] is not None}
    name = max(sizes, key=sizes.__getitem__)
    return InvalidEmbeddingError(
        f"{name} row {seen + row} holds {sum(sizes.values()):,} bytes of text ({name}: {sizes[name]:,}); the "
        f"strings of one row must stay under {STRING_BYTES_PER_SHARD:,} bytes")


WRITERS = 2  # shard files written concurrently: one can wait on fsync while the next is copied


def write_splats(fs: LakeFS, chunks: Iterable[SplatBatch], first_id: int, dim: int, dtype: str, shard_bytes: int,
                 schema: SchemaUpdate | Callable[[], SchemaUpdate],
                 progress: Callable[[int], None] | None = None, stamp: WriteStamp | None = None) -> list[ShardEntry]:
    """Write validated chunks as shard files of about ``shard_bytes`` each.

    Each chunk's rows are normalised straight into the buffer of the shard being filled, so a chunk
    is released as soon as it is copied (no concatenation of pieces). ``WRITERS`` background threads
    write, checksum and fsync full shards while the caller's thread fills the next one, so at most
    ``WRITERS + 1`` shards of rows plus one input chunk are in RAM at a time. ``schema`` may be a
    callable returning the schema so far (single-pass ingest: it is final for every column a shard holds
    by the time the shard is full). ``stamp``: what each shard file's Arrow metadata records about the
    lake (`m2m.lake.integrity.WriteStamp`; None: nothing).
    """
    step = shard_rows(dim, dtype, shard_bytes)
    shards: list[ShardEntry] = []
    next_id = first_id
    in_flight: deque[Future[ShardEntry]] = deque()
    buffers = _Buffers(dim, dtype, WRITERS + 1, step)
    current: _Filling | None = None
    schema_now = schema if callable(schema) else (lambda: schema)
    prev_id = None if stamp is None else stamp.prev_id

    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="m2m-shard-writer") as pool:

        def collect(keep: int) -> None:
            while len(in_flight) > keep:
                entry = in_flight.popleft().result()
                shards.append(entry)
                if progress is not None:
                    progress(entry.rows)

        def submit(filling: _Filling) -> None:
            nonlocal next_id, prev_id
            now = schema_now()
            prepared = filling.finish(next_id, now)
            meta = None if stamp is None else stamp.for_shard(prev_id, prepared["id"], now.label_type,
                                                              now.label_vocabulary)
            prev_id = int(prepared["id"][-1])
            collect(WRITERS - 1)  # frees the buffer set the next shard will fill
            in_flight.append(pool.submit(_write_prepared, fs, prepared, meta))
            next_id += filling.rows

        try:
            seen = 0  # input rows before this chunk (for error messages)
            for chunk in chunks:
                text = _string_bytes(chunk)  # cumulative bytes of string values, or None
                lo = 0
                while lo < chunk.rows:
                    if current is None:
                        current = _Filling(buffers, *buffers.next(chunk.rows - lo))
                    hi = min(chunk.rows, lo + step - current.rows)
                    if text is not None:  # Arrow strings of one array stay under 2 GiB: cut the shard early
                        room = STRING_BYTES_PER_SHARD - current.text_bytes
                        fit = int(np.searchsorted(text, text[lo] + room, side="right")) - 1
                        if fit <= lo:
                            if current.rows == 0:
                                raise _too_long(chunk, lo, seen)
                            submit(current)
                            current = None
                            continue
                        hi = min(hi, fit)
                        current.text_bytes += int(text[hi] - text[lo])
                    current.add(_slice(chunk, lo, hi))
                    lo = hi
                    if current.rows == step:
                        submit(current)
                        current = None
                seen += chunk.rows
            if current is not None and current.rows:
                submit(current)
            collect(0)
        finally:
            for fut in in_flight:  # an error: let running writes finish so their files can be removed
                fut.cancel()
            wait(in_flight)
    return shards


FULL_BUFFER_BYTES = 1 << 30  # shard buffers up to this size are allocated whole (their pages are touched as filled)


class _Buffers:
    """Rotating (float32, storage-dtype) shard buffers: writer threads read some while the caller
    fills the next, and no shard pays for freshly faulted pages. A shard of up to `FULL_BUFFER_BYTES`
    gets its whole buffer at once (untouched pages cost nothing); a bigger one starts at the rows in
    sight and doubles as it fills: sized from ``shard_bytes`` alone, a 3-row ingest with
    ``shard_bytes`` of 64 GiB asked for 32 GiB and died in a MemoryError. Growing every buffer
    instead cost the 1 GB Parquet ingest 40 MiB of peak RSS (607 vs 565-567 MiB, same machine: the
    old and new buffer both live while a shard of 128 MiB is copied; docs/tuning.md)."""

    def __init__(self, dim: int, dtype: str, count: int, step: int) -> None:
        self._dim, self._dtype, self._count, self._step = dim, np.dtype(dtype), count, step
        self._sets: list[tuple[np.ndarray, np.ndarray]] = []
        self._turn = 0

    def _alloc(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        f32 = np.empty((rows, self._dim), np.float32)
        return f32, f32 if self._dtype == np.float32 else np.empty((rows, self._dim), self._dtype)

    def next(self, rows: int) -> tuple[int, np.ndarray, np.ndarray]:
        """The next buffer set (its turn, float32 and storage arrays), holding at least ``rows``."""
        turn = self._turn
        whole = self._step * self._dim * (4 + self._dtype.itemsize) <= FULL_BUFFER_BYTES
        rows = self._step if whole else min(max(rows, 1), self._step)
        if len(self._sets) <= turn:
            self._sets.append(self._alloc(rows))
        elif self._sets[turn][0].shape[0] < rows:
            self._sets[turn] = self._alloc(rows)
        self._turn = (turn + 1) % self._count
        f32, store = self._sets[turn]
        return turn, f32, store

    def grow(self, turn: int, rows: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """Buffer set ``turn`` made to hold ``rows`` (doubling, at most a shard), its first ``keep``
        rows copied."""
        f32, store = self._sets[turn]
        if f32.shape[0] >= rows:
            return f32, store
        new = self._alloc(min(max(rows, 2 * f32.shape[0]), self._step))
        new[1][:keep] = store[:keep]  # (a float16 shard's float32 rows are scratch: only stored rows kept)
        self._sets[turn] = new
        return new


class _Filling:
    """One shard being filled: normalised vectors go into its buffers piece by piece; the small
    columns of each piece are kept (without the vectors, so the input chunk can be freed)."""

    def __init__(self, buffers: _Buffers, turn: int, f32: np.ndarray, store: np.ndarray) -> None:
        self.buffers, self.turn, self.f32, self.store = buffers, turn, f32, store
        self.rows = 0
        self.text_bytes = 0  # UTF-8 bytes of the string values added so far
        self.parts: list[SplatBatch] = []

    def add(self, piece: SplatBatch) -> None:
        lo, hi = self.rows, self.rows + piece.rows
        if hi > self.store.shape[0]:
            self.f32, self.store = self.buffers.grow(self.turn, hi, lo)
        target = self.store[lo:hi] if self.store.dtype == np.float32 else self.f32[lo:hi]
        if piece.norms is None:
            mu, norms = unit_rows(piece.vectors, out=target)
        else:  # stored unit vectors with their norms (consolidation): kept as they are
            np.copyto(target, piece.vectors, casting="same_kind")
            mu, norms = target, np.asarray(piece.norms, dtype=np.float64)
        if self.store.dtype != np.float32:
            import torch  # only for float16 storage: keeps torch out of opening a lake

            torch.from_numpy(self.store[lo:hi]).copy_(torch.from_numpy(mu))  # torch converts f32 -> f16 vectorised (docs/tuning.md)
        self.parts.append(SplatBatch(np.empty((piece.rows, 0), np.float32), piece.labels, piece.kappa, piece.alpha,
                                     piece.metadata, piece.ids, norms))
        self.rows = hi

    def finish(self, first_id: int, schema: SchemaUpdate) -> dict[str, Any]:
        parts = self.parts

        def cat(get: Callable[[SplatBatch], np.ndarray]) -> np.ndarray:
            return get(parts[0]) if len(parts) == 1 else np.concatenate([get(p) for p in parts])

        ids = (np.arange(first_id, first_id + self.rows, dtype=np.int64) if parts[0].ids is None
               else cat(lambda p: np.asarray(p.ids)))
        cols: dict[str, Any] = {"id": ids, "mu": self.store[:self.rows], "kappa": cat(lambda p: p.kappa),
                                "alpha": cat(lambda p: p.alpha), MU_NORM: cat(lambda p: np.asarray(p.norms))}
        if parts[0].labels is not None:
            cols["label"] = cat(lambda p: np.asarray(p.labels))
        for name in parts[0].metadata:
            typ = pa.type_for_alias(schema.metadata[name])
            # each piece cast on its own: numpy would join a uint64 piece and an int64 one as float64,
            # rounding values above 2**53 (2**60 + 1 was stored as 2**60). Unchecked casts: a piece of
            # another type than the column's passed `check_cast`, so its values are stored as given
            # (Arrow's checked cast also refuses ints a float holds exactly, 2**25 into float32)
            pieces = [pa.array(v.tolist() if v.dtype == object else v).cast(typ, safe=False)
                      for v in (p.metadata[name] for p in parts)]
            cols[name] = pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)
        return cols


def _write_prepared(fs: LakeFS, cols: dict[str, Any], meta: dict[str, str] | None = None) -> ShardEntry:
    ids = cols["id"]
    entry = write_shard_file(fs, cols, meta)
    logger.debug("wrote shard %s (%d rows)", entry.path, len(ids))
    return ShardEntry(rows=len(ids), id_min=int(ids[0]), id_max=int(ids[-1]), files=(entry,))
