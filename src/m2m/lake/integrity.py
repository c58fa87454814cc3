"""Cross-checks of a manifest's numbers against its shard files (Arrow footers and id columns).

Three levels, from cheap to complete:

- `check_batch`: a file's record batch against its manifest entry: row count, every listed column
  present with the type the manifest implies (``mu`` is ``fixed_size_list<dtype>[dim]``, ...),
  and the first/last id equal to the shard's ``id_min``/``id_max``. Touches the footer, the batch
  header and two id values; with ``full`` also checks that ids strictly ascend (reads the id column).
- `check_file`: the same from a path: size against ``bytes``, one record batch, then `check_batch`.
  `Snapshot` runs it on every file of a local lake when it is opened (a few small reads per file)
  and on every file of a remote lake when that file is first used (the first use downloads the
  file into the shard cache anyway, so opening a remote lake costs no request per file).
- `verify_files`: size, CRC32 and the full `check_batch` of every file of a version (what
  `Lake.verify` and `m2m verify` run).

The manifest's own consistency (checksum, ranges, names) is checked when it is parsed
(`m2m.lake.manifest.Manifest.from_json`).

Stamps: every file written by this m2m records in its Arrow schema metadata what it belongs to
(`WriteStamp`), so a manifest edited with a recomputed checksum cannot pair it with the wrong lake,
shard, vocabulary or geometry run:

- ``m2m.lake_id``: the lake's random id (its first manifest's ``lake_id``); a file of another lake,
  or a stamped file in a manifest without the id or in a format-1 manifest, is refused.
- ``m2m.prev_id`` (main files): the last id of the shard before it when it was written (-1: first);
  checked against the manifest's shard order, so a dropped or reordered shard is an error. A
  remote append stamps its first shard too when its reserved ids follow the head's last id; after
  a gap in ids (another writer's reservation in flight or abandoned) that one stamp is left out.
- ``m2m.next_id`` (main files of appends): the lake's ``next_id`` after that append; for the last
  shard it must equal the manifest's ``next_id`` (or its ``id_floor`` after a rollback), so a
  dropped last shard is an error.
- ``m2m.labels`` (main files with string labels): ``<n>:<sha256>`` of the first ``n`` entries of the
  label vocabulary the file was written with; the manifest's vocabulary must start with them.
- ``m2m.geometry`` (geometry sidecars): the run of ``estimate_kappa``/``consolidate`` that wrote
  it; it must equal the manifest's ``geometry["stamp"]``, so a stale sidecar is an error.

Every file's column names must equal its entry's ``columns``, and every file that holds ``id`` (new
sidecars do) is checked against its shard's id range; `verify_files` compares sidecar ids with
their shard's ids row by row and the manifest's kappa/alpha statistics with the data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa

from m2m.errors import CorruptShardError
from m2m.lake.fs import LakeFS
from m2m.lake.manifest import FileEntry, Manifest
from m2m.lake.schema import (
    ALPHA,
    ID,
    KAPPA,
    LABEL,
    MU,
    MU_NORM,
    NEIGHBOR_ALPHA,
    NEIGHBOR_COS,
    NEIGHBOR_KAPPA,
    NEIGHBOR_SAME_LABEL,
    NEIGHBORS,
)
from m2m.lake.shard import leased_copy, read_header

_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}

STAMP_LAKE = "m2m.lake_id"
STAMP_PREV = "m2m.prev_id"
STAMP_NEXT = "m2m.next_id"
STAMP_LABELS = "m2m.labels"
STAMP_GEOMETRY = "m2m.geometry"


def vocabulary_digest(vocab: Sequence[str]) -> str:
    """``<n>:<sha256 hex>`` of a label vocabulary (its order matters: codes are positions in it)."""
    body = json.dumps(list(vocab), ensure_ascii=True, separators=(",", ":")).encode()
    return f"{len(vocab)}:{hashlib.sha256(body).hexdigest()}"


@dataclass(frozen=True)
class WriteStamp:
    """What the shard files of one write record about their lake (see the module doc).

    ``prev_id``: the last id before the first shard (-1: none; None: unknown, e.g. a remote append
    after a gap in ids, whose place is only known at commit). ``labels_known``: how many vocabulary entries are final
    when the shards are written (None: all, as in a local commit under the lock; a remote append
    stamps only the entries of the head it was validated against). ``append``: stamp ``next_id``.
    """

    lake_id: str | None
    prev_id: int | None = None
    labels_known: int | None = None
    append: bool = False

    def for_shard(self, prev_id: int | None, ids: Any, label_type: str | None,
                  vocab: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.lake_id is not None:
            out[STAMP_LAKE] = self.lake_id
        if prev_id is not None:
            out[STAMP_PREV] = str(int(prev_id))
        if self.append:
            out[STAMP_NEXT] = str(int(ids[-1]) + 1)
        if label_type == "string":
            n = len(vocab) if self.labels_known is None else min(self.labels_known, len(vocab))
            out[STAMP_LABELS] = vocabulary_digest(vocab[:n])
        return out


def merged_stamp(m: Manifest, batches: Sequence[pa.RecordBatch]) -> dict[str, str]:
    """The stamps of one file that holds ``batches`` (the files of one column slot of consecutive
    shards of ``m``, each already checked against ``m``) concatenated, as `m2m.lake.compact` writes
    it: what each stamp says of the run as a whole. ``m2m.lake_id`` the lake's; ``m2m.prev_id`` the
    first file's, ``m2m.next_id`` the last file's (they describe the run's edges); ``m2m.labels`` the
    longest vocabulary prefix any of them was written with; ``m2m.geometry`` the run's when every
    file has the same. Merged files without them were served after another lake's file was listed
    in their place (the checks skip a file without stamps)."""
    metas = [_meta(b) for b in batches]
    out: dict[str, str] = {}
    if m.lake_id is not None:
        out[STAMP_LAKE] = m.lake_id
    if metas and STAMP_PREV in metas[0]:
        out[STAMP_PREV] = metas[0][STAMP_PREV]
    if metas and STAMP_NEXT in metas[-1]:
        out[STAMP_NEXT] = metas[-1][STAMP_NEXT]
    labels = [x[STAMP_LABELS] for x in metas if STAMP_LABELS in x]
    if labels:
        out[STAMP_LABELS] = max(labels, key=lambda v: int(v.partition(":")[0]))
    geometry = {x.get(STAMP_GEOMETRY) for x in metas}
    if len(geometry) == 1 and None not in geometry:
        out[STAMP_GEOMETRY] = geometry.pop()  # type: ignore[assignment]
    return out


def _meta(batch: pa.RecordBatch) -> dict[str, str]:
    raw = batch.schema.metadata or {}
    out = {}
    for k, v in raw.items():
        if k.startswith(b"m2m."):
            try:
                out[k.decode()] = v.decode()
            except UnicodeDecodeError:
                out[k.decode(errors="replace")] = "\ufffd"
    return out


def _stamp_int(meta: dict[str, str], key: str, where: str) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise CorruptShardError(f"shard file {where}: metadata {key} = {v!r} is not an int") from None


#: value types of the geometry sidecars' fixed_size_list<...>[k] columns
_NEIGHBOUR_TYPES = {NEIGHBORS: pa.int64(), NEIGHBOR_COS: pa.float32(), NEIGHBOR_KAPPA: pa.float32(),
                    NEIGHBOR_ALPHA: pa.float32(), NEIGHBOR_SAME_LABEL: pa.bool_()}


def expected_type(m: Manifest, column: str) -> pa.DataType | str:
    """The Arrow type (or, for metadata, the type string) the manifest implies for ``column``."""
    if column == ID:
        return pa.int64()
    if column == MU:
        return pa.list_(_DTYPES[m.dtype], m.dim)
    if column in (KAPPA, ALPHA):
        return pa.float32()
    if column == MU_NORM:
        return pa.float64()
    if column == LABEL and m.label_type is not None:
        return pa.string() if m.label_type == "string" else pa.int64()
    if column in _NEIGHBOUR_TYPES:
        k = int((m.geometry or {}).get("k", -1))
        return pa.list_(_NEIGHBOUR_TYPES[column], k)
    return m.metadata.get(column, "?")


def _type_ok(actual: pa.DataType, want: pa.DataType | str) -> bool:
    if isinstance(want, str):
        return str(actual) == want
    if pa.types.is_fixed_size_list(want):
        return (pa.types.is_fixed_size_list(actual) and actual.list_size == want.list_size
                and actual.value_type == want.value_type)
    return bool(actual == want)


def check_batch(m: Manifest, shard: int, entry: FileEntry, batch: pa.RecordBatch, where: str,
                full: bool = False) -> None:
    """`CorruptShardError` naming ``where`` when ``batch`` (file ``entry`` of shard ``shard``) disagrees
    with the manifest (see the module doc)."""
    s = m.shards[shard]
    if batch.num_rows != s.rows:
        raise CorruptShardError(f"shard file {where} has {batch.num_rows} rows, the manifest says {s.rows} "
                                f"(shard {shard} of version {m.version})")
    names = batch.schema.names
    if set(names) != set(entry.columns):
        raise CorruptShardError(f"shard file {where} holds columns {sorted(names)}, its manifest entry lists "
                                f"{sorted(entry.columns)} (shard {shard} of version {m.version})")
    for col in entry.columns:
        if col not in names:
            raise CorruptShardError(f"shard file {where} has no column {col!r} (the manifest lists it; "
                                    f"the file has {names})")
        want = expected_type(m, col)
        actual = batch.schema.field(col).type
        if not _type_ok(actual, want):
            raise CorruptShardError(f"shard file {where}: column {col!r} is {actual}, the manifest implies {want}")
    if ID in names:
        ids = batch.column(ID)
        if ids.null_count:
            raise CorruptShardError(f"shard file {where}: column 'id' has {ids.null_count} nulls")
        first, last = ids[0].as_py(), ids[-1].as_py()
        if (first, last) != (s.id_min, s.id_max):
            raise CorruptShardError(f"shard file {where} holds ids {first}..{last}, the manifest says "
                                    f"{s.id_min}..{s.id_max} (shard {shard} of version {m.version})")
        if full:
            arr = ids.to_numpy(zero_copy_only=True)
            step = np.diff(arr)
            if len(step) and not (step > 0).all():
                row = int(np.argmax(step <= 0)) + 1
                raise CorruptShardError(f"shard file {where}: ids do not strictly ascend at row {row} "
                                        f"({arr[row - 1]} then {arr[row]})")
    _check_stamps(m, shard, entry, batch, where)


def _check_stamps(m: Manifest, shard: int, entry: FileEntry, batch: pa.RecordBatch, where: str) -> None:
    """The file's stamps against the manifest (module doc); files without stamps get the other checks."""
    meta = _meta(batch)
    s = m.shards[shard]
    lake = meta.get(STAMP_LAKE)
    if lake is not None:
        if m.format_version < 2:
            raise CorruptShardError(f"shard file {where} was written for a format-2 lake, but version {m.version}'s "
                                    f"manifest is format {m.format_version} (a format downgrade)")
        if m.lake_id is None:
            raise CorruptShardError(f"shard file {where} belongs to lake {lake}, but version {m.version}'s manifest "
                                    "has no lake_id (removed from the manifest?)")
        if lake != m.lake_id:
            raise CorruptShardError(f"shard file {where} belongs to another lake ({lake}, this lake is {m.lake_id})")
    elif m.lake_id is not None and ID not in batch.schema.names:
        raise CorruptShardError(f"shard file {where} has no 'id' column and no lake id: not a file of lake {m.lake_id}")
    if entry is s.files[0]:
        prev = _stamp_int(meta, STAMP_PREV, where)
        want = m.shards[shard - 1].id_max if shard else -1
        if prev is not None and prev != want:
            raise CorruptShardError(f"shard file {where} was written after id {prev}, but in version {m.version} it "
                                    f"follows {'nothing' if want < 0 else f'id {want}'} (a shard dropped, added "
                                    "or moved?)")
        nxt = _stamp_int(meta, STAMP_NEXT, where)
        if nxt is not None and shard == len(m.shards) - 1 and m.next_id != max(nxt, m.id_floor):
            raise CorruptShardError(f"shard file {where} is the last shard of version {m.version} and was written "
                                    f"with next_id {nxt}, but the manifest says next_id {m.next_id} (a shard "
                                    "dropped?)")
        labels = meta.get(STAMP_LABELS)
        if labels is not None:
            n_text, _, _ = labels.partition(":")
            n = int(n_text) if n_text.isdigit() else -1
            if not 0 <= n <= len(m.label_vocabulary) or vocabulary_digest(m.label_vocabulary[:n]) != labels:
                raise CorruptShardError(f"shard file {where} was written with another label vocabulary than version "
                                        f"{m.version}'s (reordered or edited label_vocabulary)")
    geo = meta.get(STAMP_GEOMETRY)
    if geo is not None:
        want_geo = (m.geometry or {}).get("stamp")
        if want_geo is not None and geo != str(want_geo):
            raise CorruptShardError(f"shard file {where} is a geometry sidecar of run {geo}, but version {m.version}'s "
                                    f"geometry is run {want_geo} (a stale sidecar)")


def open_batch(path: str, expected_bytes: int, ids: str = "all") -> pa.RecordBatch:
    """The single record batch of the Arrow IPC file at ``path``: its Arrow metadata and its ``id``
    column (every id, or with ``ids="edges"`` the first and last) read with positional reads into
    private memory (`m2m.lake.shard.read_header`; never a memory map, so a file cut short while it
    is read is `CorruptShardError`, not SIGBUS). Other columns' values are NOT read (they read as
    zeros): read data with `m2m.lake.shard.open_shard_file`."""
    return read_header(path, FileEntry(path=path, bytes=expected_bytes, crc32=0, columns=()), ids=ids)


def file_name(fs: LakeFS, rel: str) -> str:
    """How messages name a lake's file: its path, or a remote lake's object URL (not the node cache's
    private copy, which is gone when the handle closes)."""
    return fs.local_path(rel) if fs.is_local else f"{fs.url}/{rel}"


def check_file(fs: LakeFS, m: Manifest, shard: int, entry: FileEntry, full: bool = False) -> None:
    """`check_batch` of one file, opened from ``fs`` (a remote file is fetched into the shard cache and
    its copy checked: a damaged copy is downloaded once more, `m2m.lake.shard.leased_copy`)."""
    with leased_copy(fs, entry) as path:
        batch = open_batch(path, entry.bytes, ids="all" if full else "edges")
    check_batch(m, shard, entry, batch, file_name(fs, entry.path), full=full)


def check_key(m: Manifest, shard: int, entry: FileEntry) -> tuple[object, ...]:
    """What a footer check of ``entry`` depends on: a memo of checked keys stays valid across versions."""
    s = m.shards[shard]
    types = tuple(str(expected_type(m, c)) for c in entry.columns)
    main = entry is s.files[0]
    context = (m.lake_id, m.format_version, str((m.geometry or {}).get("stamp")),
               m.shards[shard - 1].id_max if shard and main else None,
               (m.next_id, m.id_floor) if main and shard == len(m.shards) - 1 else None,
               _vocab_key(m) if main else None)
    return (entry.path, entry.bytes, s.rows, s.id_min, s.id_max, types, frozenset(entry.columns), context)


def _vocab_key(m: Manifest) -> int:
    return hash(m.label_vocabulary)


def files_of(m: Manifest) -> Iterable[tuple[int, FileEntry]]:
    """``(shard index, file)`` of every file of ``m``."""
    return ((i, f) for i, s in enumerate(m.shards) for f in s.files)


def check_footers(fs: LakeFS, m: Manifest, done: set[tuple[object, ...]] | None = None) -> None:
    """`check_file` (footers only) of every file of ``m`` whose `check_key` is not in ``done``; adds them."""
    for i, f in files_of(m):
        key = check_key(m, i, f)
        if done is not None and key in done:
            continue
        check_file(fs, m, i, f)
        if done is not None:
            done.add(key)


def verify_files(fs: LakeFS, m: Manifest, progress: Callable[[int], None] | None = None) -> list[str]:
    """Size, CRC32 and full footer/id checks of every file of ``m``; returns the problems found."""
    from m2m.lake.shard import verify_file

    problems = []
    main_ids: dict[int, Any] = {}
    for i, f in files_of(m):
        try:
            verify_file(fs, f)
            check_file(fs, m, i, f, full=True)
            _check_sidecar_ids(fs, m, i, f, main_ids)
        except CorruptShardError as exc:
            problems.append(str(exc))
        if progress is not None:
            progress(1)
    return problems


def _check_sidecar_ids(fs: LakeFS, m: Manifest, shard: int, entry: FileEntry, main_ids: dict[int, Any]) -> None:
    """Every id of a file that holds ids equals its shard's main file's, row by row."""
    batch = open_batch(fs.local_path(entry.path), entry.bytes)
    path = file_name(fs, entry.path)
    if ID not in batch.schema.names:
        return
    ids = batch.column(ID).to_numpy(zero_copy_only=False).copy()
    if entry is m.shards[shard].files[0]:
        main_ids[shard] = ids
        return
    want = main_ids.get(shard)
    if want is not None and not np.array_equal(ids, want):
        row = int(np.argmax(ids != want)) if len(ids) == len(want) else 0
        raise CorruptShardError(f"shard file {path} (a sidecar) holds other ids than its shard's main file "
                                f"(first difference at row {row}): it belongs to another shard or version")


def check_stats(m: Manifest, kappa: Any, alpha: Any) -> str | None:
    """A problem when the manifest's kappa/alpha statistics disagree with the data, else None."""
    from m2m.lake.summary import summarize

    if not m.stats:
        return None
    got = summarize(np.asarray(kappa, np.float32), np.asarray(alpha, np.float32))
    for key in ("kappa", "alpha"):
        stored = m.stats.get(key) or {}
        for name in ("count", "sum"):
            if name not in stored or name not in got[key]:
                continue
            a, b = float(stored[name]), float(got[key][name])
            if abs(a - b) > 1e-4 * max(1.0, abs(b)):
                return (f"manifest stats.{key}.{name} = {stored[name]!r} but the data of version {m.version} "
                        f"give {got[key][name]!r}")
    return None
