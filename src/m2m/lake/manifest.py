"""Snapshot manifests: one immutable JSON file per lake version, written last and atomically.

Formats: 3 (a version file over immutable segment files; written once a lake has more than
`SEGMENT_SHARDS` shards, and ever after), 2 (every shard inline; written for smaller lakes) and 1
(read only). Format 3 is format 2 with ``shards`` replaced by ``segments``, references
``{"path": "_segments/<32 hex>.json", "shards", "id_min", "id_max", "rows", "bytes", "sha256"[, "geometry_rows"]}``
to files ``{"format": "m2m-segment", "lake_id", "shards": [...]}`` of up to `SEGMENT_SHARDS` shard
entries, in order; a commit reuses every segment whose entries it keeps unchanged and writes new
segments before the version file (docs/format.md, section 4.1). Reading checks the version file and
the last segment; every other segment is read and checked on first use (`SegmentRef.entries`,
`ShardList`). Format 2:

- ``_manifests/v{version:010d}.json`` is one JSON object with ``format = "m2m-lake"``,
  ``format_version``, ``version``, ``parent``, ``created``, ``dim``, ``dtype`` (``float32`` or
  ``float16``), ``next_id``, ``rows`` (v2: the sum of the shards' rows), ``label_type`` (null,
  ``int64`` or ``string``), ``label_vocabulary``, ``metadata`` (column name -> Arrow type string),
  ``geometry`` (null or ``{"k": ..., ...}``), ``operation``, ``stats``, ``shards`` and (v2)
  ``checksum``.
- ``checksum`` (v2) is ``"sha256:<hex>"``: SHA-256 of the canonical JSON of the whole object without
  the ``checksum`` key (``json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``,
  UTF-8). Any edit of any field, block checksums included, makes the manifest unreadable.
- each shard is ``{"rows", "id_min", "id_max", "files"}``: a run of ``rows`` >= 1 rows with strictly
  ascending ids, the first ``id_min`` and the last ``id_max``; shards are in ascending id order,
  their ranges do not overlap and every id is below ``next_id``. Every file of a shard has exactly
  ``rows`` rows.
- each file is ``{"path", "bytes", "crc32", "columns"}`` plus, when present, ``block_bytes`` and
  ``block_crc32c`` (CRC32C of each ``block_bytes``-byte block of the file, the last one possibly
  shorter: ``ceil(bytes / block_bytes)`` values). ``bytes`` is the file's
  size and ``crc32`` the zlib CRC32 of all of it. ``path`` is ``_data/<name>`` where ``<name>`` is a
  plain file name: letters, digits, ``_``, ``-``, ``.``, at most 200 characters, starting with a
  letter, digit or ``_``, without ``..``; anything else is refused before any file is touched. A
  path appears once per manifest. The first file of a shard holds ``id``, ``mu``, ``kappa``,
  ``alpha``, ``label`` (when the lake has labels) and every metadata column; later files
  (sidecars, e.g. ``kappa``, ``neighbors``, ``neighbor_cos``) override the columns they list.
  Geometry sidecars list ``kappa``, ``neighbors`` and ``neighbor_cos`` together (new ones also
  ``id``, which binds them to their shard, and may list ``neighbor_kappa`` and ``neighbor_alpha``
  together, with ``neighbor_same_label`` on lakes with labels; no other file lists these); the shards that have one hold ``geometry["rows"]``
  rows together (estimate_kappa covers every shard, later appends add shards without).

`Manifest.from_json` checks all of this (the checksum, types, ranges, names and the id layout)
without touching any shard file; `m2m.lake.integrity` cross-checks the numbers against the shard
files' Arrow footers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import operator
import os
import re
import stat
import time
import uuid
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, overload

from m2m._forksafe import ForkSafeLock
from m2m.errors import (
    CommitConflictError,
    CorruptShardError,
    InvalidManifestError,
    LakeNotFoundError,
    PositionError,
    SignatureError,
    UnknownColumnError,
)
from m2m.lake.fs import LakeFS
from m2m.lake.schema import (
    GEOMETRY_COLUMNS,
    KAPPA,
    LABEL,
    MAIN_COLUMNS,
    NEIGHBOR_ALPHA,
    NEIGHBOR_KAPPA,
    NEIGHBORS,
    NEIGHBOUR_TERMS,
    OPTIONAL_MAIN_COLUMNS,
)

logger = logging.getLogger(__name__)

FORMAT_NAME = "m2m-lake"
FORMAT_VERSION = 3            # the newest format this m2m writes (small lakes: 2, see `segments_wanted`)
INLINE_FORMAT_VERSION = 2     # shards listed in the version file itself
READABLE_FORMAT_VERSIONS = (1, 2, 3)
CHECKSUM_ALGORITHM = "sha256"
MANIFEST_DIR = "_manifests"
DATA_DIR = "_data"
SEGMENT_DIR = "_segments"
SEGMENT_FORMAT = "m2m-segment"
# shards per segment file: an append rewrites at most one segment of this many entries, and a version
# file lists one reference per segment (see docs/format.md for the measured curve)
SEGMENT_SHARDS = 256
_SEGMENT_NAME_RE = re.compile(r"[0-9a-f]{32}\.json")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
DTYPES = ("float32", "float16")
LABEL_TYPES = ("int64", "string")
_MANIFEST_RE = re.compile(r"v(\d{10})\.json")        # used with fullmatch: no trailing newline
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
_LAKE_ID_RE = re.compile(r"[0-9a-f]{32}")
SIGNATURE_ALGORITHM = "hmac-sha256"
KEY_ENV = "M2M_LAKE_KEY"
_Key = bytes  # (inside Manifest, ``bytes`` is its size property)
_U32 = 1 << 32
_I64_MAX = (1 << 63) - 1


def check_file_path(path: Any) -> str:
    """``path`` if it is ``_data/<plain name>``, else ValueError naming it (nothing is touched)."""
    if not isinstance(path, str):
        raise InvalidManifestError(f"file path {path!r} is not a string")
    prefix, sep, name = path.partition("/")
    if prefix != DATA_DIR or not sep or not _FILE_NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidManifestError(f"file path {path!r} is not a plain file name inside {DATA_DIR}/")
    return path


@dataclass(frozen=True)
class FileEntry:
    """One immutable Arrow IPC file holding some columns of a shard.

    ``block_bytes``/``block_crc32c``: optional per-block CRC32C checksums of the file (both or
    neither), serialised and covered by the manifest checksum when present.
    """

    path: str
    bytes: int
    crc32: int
    columns: tuple[str, ...]
    # per-block crc32c of the file cut into ``block_bytes``-byte blocks (the last may be shorter):
    # checked on every read from disk by the stream; None in files written before they existed
    block_bytes: int | None = None
    block_crc32c: tuple[int, ...] | None = None
    # SHA-256 of the whole file (hex), written in signed lakes: CRCs are linear, so someone with write
    # access and no key could change a file and keep every CRC (observed); checked at first open
    sha256: str | None = None

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "bytes": self.bytes, "crc32": self.crc32,
                               "columns": list(self.columns)}
        if self.block_bytes is not None:
            doc["block_bytes"] = self.block_bytes
        if self.block_crc32c is not None:
            doc["block_crc32c"] = list(self.block_crc32c)
        if self.sha256 is not None:
            doc["sha256"] = self.sha256
        return doc


@dataclass(frozen=True)
class ShardEntry:
    """A run of rows with ascending ids; its columns may come from several files (later files win)."""

    rows: int
    id_min: int
    id_max: int
    files: tuple[FileEntry, ...]

    def file_for(self, column: str) -> FileEntry:
        for f in reversed(self.files):
            if column in f.columns:
                return f
        raise UnknownColumnError(f"no file of this shard holds column {column!r}")

    def to_doc(self) -> dict[str, Any]:
        return {"rows": self.rows, "id_min": self.id_min, "id_max": self.id_max,
                "files": [f.to_doc() for f in self.files]}


@dataclass(frozen=True)
class SegmentRef:
    """A format-3 version file's reference to one immutable segment file (``_segments/<32 hex>.json``).

    ``shards``, ``id_min``, ``id_max`` and ``rows`` summarise the segment's entries; ``bytes`` and
    ``sha256`` are the file's size and SHA-256, so the version file's checksum (and signature) covers
    every shard entry; ``geometry_rows`` (written since lazy segments; None in older version files):
    the rows of its shards with geometry sidecars, so the version's totals are checked without
    reading the segment.

    ``entries`` are the parsed shard entries (not serialised). A reference read from a version file
    loads them the first time they are asked for (from any thread): the file is read, its size and
    SHA-256 compared with the reference, its lake id, every entry and the summary checked, before
    any entry is returned; a mismatch raises `CorruptShardError` naming the version file and segment.
    """

    path: str
    shards: int
    id_min: int
    id_max: int
    rows: int
    bytes: int
    sha256: str
    loaded: tuple[ShardEntry, ...] | None = field(default=None, compare=False, repr=False)
    geometry_rows: int | None = None
    # where a lazy reference loads its entries from (None: ``loaded`` is given)
    source: "_SegmentSource | None" = field(default=None, compare=False, repr=False)
    index: int = field(default=0, compare=False, repr=False)   # in its version file (messages)
    first: int = field(default=0, compare=False, repr=False)   # index of its first shard (messages)

    @property
    def entries(self) -> tuple[ShardEntry, ...]:
        got = self.loaded
        if got is None:
            if self.source is None:
                return ()
            got = self.source.load(self)
            object.__setattr__(self, "loaded", got)
        return got

    @property
    def is_loaded(self) -> bool:
        """Whether ``entries`` are in memory already (this reference's, or its lake handle's memo)."""
        return self.loaded is not None or (self.source is not None and self.source.has(self))

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "shards": self.shards, "id_min": self.id_min,
                               "id_max": self.id_max, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}
        if self.geometry_rows is not None:
            doc["geometry_rows"] = self.geometry_rows
        return doc


class ShardList(Sequence[ShardEntry]):
    """The shards of a format-3 manifest: a run of segment references (whose entries load on first
    use, see `SegmentRef.entries`) and in-memory tuples of entries (what a commit adds).

    Length, rows and concatenation need no segment; indexing loads the segment holding the shard,
    slicing those overlapping the slice (and returns a tuple), iteration each in turn. Equal to any
    tuple or `ShardList` holding equal entries in the same order."""

    __slots__ = ("_parts", "_starts", "_len")

    def __init__(self, parts: Sequence[SegmentRef | tuple[ShardEntry, ...]]) -> None:
        self._parts: tuple[SegmentRef | tuple[ShardEntry, ...], ...] = tuple(
            p for p in parts if (p.shards if isinstance(p, SegmentRef) else len(p)))
        starts = []
        at = 0
        for p in self._parts:
            starts.append(at)
            at += p.shards if isinstance(p, SegmentRef) else len(p)
        self._starts = starts
        self._len = at

    @property
    def parts(self) -> tuple[SegmentRef | tuple[ShardEntry, ...], ...]:
        return self._parts

    @property
    def rows(self) -> int:
        """Rows of all shards (a segment's from its reference, checked against its entries on load)."""
        return sum(p.rows if isinstance(p, SegmentRef) else _rows_of(p) for p in self._parts)

    @staticmethod
    def _entries(p: SegmentRef | tuple[ShardEntry, ...]) -> tuple[ShardEntry, ...]:
        return p.entries if isinstance(p, SegmentRef) else p

    def load(self) -> "ShardList":
        """Load (and check) every segment now, on an object store with overlapped reads
        (`load_segments`); returns self."""
        load_segments([p for p in self._parts if isinstance(p, SegmentRef)])
        return self

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> ShardEntry: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[ShardEntry, ...]: ...

    def __getitem__(self, i: int | slice) -> ShardEntry | tuple[ShardEntry, ...]:
        if isinstance(i, slice):
            lo, hi, step = i.indices(self._len)
            if step != 1:
                return tuple(self[k] for k in range(lo, hi, step))
            if lo >= hi:
                return ()
            out: list[ShardEntry] = []
            k = bisect_right(self._starts, lo) - 1
            while k < len(self._parts) and self._starts[k] < hi:
                start = self._starts[k]
                out.extend(self._entries(self._parts[k])[max(lo - start, 0):hi - start])
                k += 1
            return tuple(out)
        n = operator.index(i)
        if n < 0:
            n += self._len
        if not 0 <= n < self._len:
            raise PositionError(f"shard {i} is not in [0, {self._len})")
        k = bisect_right(self._starts, n) - 1
        return self._entries(self._parts[k])[n - self._starts[k]]

    def __iter__(self) -> Iterator[ShardEntry]:
        for p in self._parts:
            yield from self._entries(p)

    def __add__(self, other: Sequence[ShardEntry]) -> "ShardList":
        more = other.parts if isinstance(other, ShardList) else (tuple(other),)
        return ShardList(self._parts + more)

    def __radd__(self, other: Sequence[ShardEntry]) -> "ShardList":
        return ShardList((tuple(other),) + self._parts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (tuple, ShardList)):
            return NotImplemented
        return len(self) == len(other) and all(a is b or a == b for a, b in zip(self, other))

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ShardList({self._len} shards in {len(self._parts)} parts)"


Shards = tuple[ShardEntry, ...] | ShardList


@dataclass(frozen=True)
class Manifest:
    """The full description of one lake version."""

    version: int
    dim: int
    dtype: str
    next_id: int
    # a tuple, or (format 3, as read or derived from a read manifest) a `ShardList` whose segments load
    # on first use
    shards: Shards
    label_type: str | None = None
    label_vocabulary: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    geometry: dict[str, Any] | None = None
    operation: dict[str, Any] = field(default_factory=dict)
    parent: int | None = None
    created: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION  # of the file it was read from (new manifests: FORMAT_VERSION)
    # random id of the lake, given by its first manifest and stamped into every file written since
    # (None: a lake created before lake ids existed; it gets the checks that need no id)
    lake_id: str | None = None
    # the lowest next_id a rollback may leave above the last shard (ids of abandoned versions)
    id_floor: int = 0
    # the segment files ``shards`` were read from (format 3) or last published as: a hint for the
    # writer, which reuses a segment only when its entries are exactly a run of ``shards``
    segments: tuple[SegmentRef, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def rows(self) -> int:
        got = self.__dict__.get("_rows")
        if got is None:  # memo: a frozen manifest's shards never change
            shards = self.shards
            got = shards.rows if isinstance(shards, ShardList) else _rows_of(shards)
            object.__setattr__(self, "_rows", got)
        return int(got)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for s in load_all(self.shards) for f in s.files)

    def files(self) -> list[FileEntry]:
        return [f for s in load_all(self.shards) for f in s.files]

    def next(self, **changes: Any) -> "Manifest":
        """The manifest of the next version, derived from this one (always written as the current format)."""
        return replace(self, version=self.version + 1, parent=self.version, created=time.time(),
                       format_version=FORMAT_VERSION, **changes)

    def to_doc(self, segments: tuple[SegmentRef, ...] | None = None) -> dict[str, Any]:
        """The JSON object of this manifest, ``checksum`` included: format 2 (every shard inline), or
        with ``segments`` (the published segment files holding ``shards``, in order) format 3."""
        doc: dict[str, Any] = {
            "format": FORMAT_NAME, "format_version": INLINE_FORMAT_VERSION if segments is None else 3,
            "version": self.version,
            "parent": self.parent, "created": self.created, "dim": self.dim, "dtype": self.dtype,
            "next_id": self.next_id, "rows": self.rows if segments is None else sum(g.rows for g in segments),
            "label_type": self.label_type,
            "label_vocabulary": list(self.label_vocabulary), "metadata": dict(self.metadata),
            "geometry": self.geometry, "operation": dict(self.operation), "stats": dict(self.stats),
        }
        if segments is None:
            doc["shards"] = [s.to_doc() for s in self.shards]
        else:
            doc["segments"] = [g.to_doc() for g in segments]
        if self.lake_id is not None:
            doc["lake_id"] = self.lake_id
        if self.id_floor:
            doc["id_floor"] = self.id_floor
        doc["checksum"] = manifest_checksum(doc)
        return doc

    def to_json(self, key: _Key | None = None, segments: tuple[SegmentRef, ...] | None = None) -> _Key:
        """The manifest file's bytes; with ``key`` signed (``signature``: HMAC-SHA256 of `canonical_json`)."""
        doc = self.to_doc(segments)
        if key is not None:
            doc["signature"] = manifest_signature(doc, key)
        if segments is not None:  # format 3: compact (json's C encoder; indenting runs in Python)
            return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @staticmethod
    def from_json(data: _Key, where: str, key: _Key | None = None, fs: LakeFS | None = None) -> "Manifest":
        """Parse and check a manifest; `CorruptShardError` naming ``where`` and the first problem found.

        Checks the checksum (v2, v3), every field's type and range, file names, and the id layout;
        reads no shard file (see `m2m.lake.integrity` for the checks against the files). A format-3
        version file's segments are read from ``fs`` and checked against their SHA-256 and summary.
        With ``key`` (a signed lake) the manifest must carry a matching ``signature``; without, a
        signed manifest is refused (its lake expects a key).
        """
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise CorruptShardError(f"manifest {where} is corrupt: {exc}") from exc
        if key is not None and isinstance(doc, dict) and isinstance(doc.get("checksum"), str):
            # the checksum first: a damaged signed manifest is damage (repair moves it aside), not a forgery
            actual = manifest_checksum(doc)
            if doc["checksum"] != actual:
                raise CorruptShardError(f"manifest {where} is corrupt: checksum mismatch: stored {doc['checksum']}, "
                                        f"content {actual}")
        check_signature(doc, key, where)
        try:
            return _parse(doc, fs, where)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise CorruptShardError(f"manifest {where} is corrupt: {what}") from exc


def canonical_json(doc: dict[str, Any]) -> bytes:
    """The bytes the manifest checksum and signature cover: ``doc`` without ``checksum`` and
    ``signature``, canonical JSON."""
    body = {k: v for k, v in doc.items() if k not in ("checksum", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_checksum(doc: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of `canonical_json` of ``doc``."""
    return f"{CHECKSUM_ALGORITHM}:{hashlib.sha256(canonical_json(doc)).hexdigest()}"


def manifest_signature(doc: dict[str, Any], key: bytes) -> str:
    """``"hmac-sha256:<hex>"``: HMAC-SHA256 under ``key`` of `canonical_json` of ``doc``."""
    return f"{SIGNATURE_ALGORITHM}:{hmac.new(key, canonical_json(doc), hashlib.sha256).hexdigest()}"


def lake_key(configured: str | bytes | None = None) -> bytes | None:
    """The signing key of a lake: ``configured`` (`M2MConfig.lake_key`), else ``$M2M_LAKE_KEY``, else None."""
    key: str | bytes | None = configured if configured else os.environ.get(KEY_ENV) or None
    if key is None:
        return None
    return key.encode() if isinstance(key, str) else bytes(key)


def check_signature(doc: Any, key: bytes | None, where: str) -> None:
    """`SignatureError` (one line) unless ``doc`` is signed under ``key``, or unsigned and no key is set."""
    if not isinstance(doc, dict):
        return  # refused by the parser
    sig = doc.get("signature")
    if key is None:
        if sig is not None:
            raise SignatureError(f"manifest {where} is signed: set the lake's key (M2MConfig.lake_key or ${KEY_ENV}) "
                                 "to read this lake")
        return
    if sig is None:
        raise SignatureError(f"manifest {where} is not signed, but the lake is read with a signing key "
                             "(refused: an unsigned manifest may be forged)")
    if not isinstance(sig, str) or not hmac.compare_digest(sig, manifest_signature(doc, key)):
        raise SignatureError(f"manifest {where}: its signature does not match the lake key (forged, or another key)")


def _int(doc: dict[str, Any], key: str, low: int = 0, high: int = _I64_MAX, where: str = "") -> int:
    v = doc[key]
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise InvalidManifestError(f"{where}{key} = {v!r} is not an int in [{low}, {high}]")
    return v


def _parse(doc: Any, fs: LakeFS | None = None, where: str = "") -> Manifest:
    if not isinstance(doc, dict):
        raise InvalidManifestError(f"not a JSON object but {type(doc).__name__}")
    if doc.get("format") != FORMAT_NAME:
        raise InvalidManifestError(f"not an m2m manifest (format={doc.get('format')!r})")
    fv = doc.get("format_version")
    if isinstance(fv, int) and not isinstance(fv, bool) and fv > FORMAT_VERSION:
        raise InvalidManifestError(f"format_version {fv} is newer than this m2m reads ({FORMAT_VERSION}); upgrade m2m")
    if not isinstance(fv, int) or isinstance(fv, bool) or fv not in READABLE_FORMAT_VERSIONS:
        raise InvalidManifestError(f"format_version {fv!r} is not one of {READABLE_FORMAT_VERSIONS}")
    if fv >= 2:
        stored = doc.get("checksum")
        if not isinstance(stored, str):
            raise InvalidManifestError("the checksum is missing")
        actual = manifest_checksum(doc)
        if stored != actual:
            raise InvalidManifestError(f"checksum mismatch: stored {stored}, content {actual}")
    dtype = doc["dtype"]
    if dtype not in DTYPES:
        raise InvalidManifestError(f"dtype {dtype!r} is not one of {DTYPES}")
    label_type = doc.get("label_type")
    if label_type is not None and label_type not in LABEL_TYPES:
        raise InvalidManifestError(f"label_type {label_type!r} is not null or one of {LABEL_TYPES}")
    vocab = doc.get("label_vocabulary") or []
    if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab) or len(set(vocab)) != len(vocab):
        raise InvalidManifestError("label_vocabulary is not a list of distinct strings")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and k and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise InvalidManifestError("metadata is not an object of column name -> type string")
    geometry = doc.get("geometry")
    if geometry is not None:
        if not isinstance(geometry, dict):
            raise InvalidManifestError("geometry is not an object")
        _int(geometry, "k", 0, 1 << 20, "geometry.")
    for key in ("operation", "stats"):
        if not isinstance(doc.get(key) or {}, dict):
            raise InvalidManifestError(f"{key} is not an object")
    _check_stats(doc.get("stats") or {})
    lake_id = doc.get("lake_id")
    if lake_id is not None and (not isinstance(lake_id, str) or not _LAKE_ID_RE.fullmatch(lake_id)):
        raise InvalidManifestError(f"lake_id {lake_id!r} is not 32 hex digits")
    id_floor = _int(doc, "id_floor") if "id_floor" in doc else 0
    parent = doc.get("parent")
    version = _int(doc, "version")
    if parent is not None and (not isinstance(parent, int) or isinstance(parent, bool) or not 0 <= parent < version):
        raise InvalidManifestError(f"parent {parent!r} is not a version below {version}")
    created = doc.get("created", 0.0)
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise InvalidManifestError(f"created {created!r} is not a number")
    segments: tuple[SegmentRef, ...] | None = None
    source: _SegmentSource | None = None
    shards: Shards
    if fv >= 3:
        if "shards" in doc:
            raise InvalidManifestError("a format-3 version file lists its shards in segments, not inline")
        if fs is None:
            raise InvalidManifestError("a format-3 version file needs its lake to read its segments")
        source = _SegmentSource(fs, lake_id, where)
        segments = _segment_refs(doc, source)
        shards = ShardList(segments)
    else:
        if not isinstance(doc["shards"], list):
            raise InvalidManifestError("shards is not a list")
        shards = tuple(_shard(s, i) for i, s in enumerate(doc["shards"]))
    m = Manifest(
        version=version, dim=_int(doc, "dim", 1, 1 << 24), dtype=dtype, next_id=_int(doc, "next_id"),
        shards=shards, segments=segments, label_type=label_type,
        label_vocabulary=tuple(vocab), metadata=dict(metadata), geometry=geometry,
        operation=dict(doc.get("operation") or {}), parent=parent, created=float(created),
        stats=dict(doc.get("stats") or {}), format_version=fv, lake_id=lake_id, id_floor=id_floor)
    if fv < 2 and (lake_id is not None or id_floor):
        raise InvalidManifestError("format_version 1 with a lake_id: a format-2 manifest rewritten as format 1")
    if id_floor > m.next_id:
        raise InvalidManifestError(f"id_floor {id_floor} is above next_id {m.next_id}")
    if fv >= 2 and _int(doc, "rows") != m.rows:
        raise InvalidManifestError(f"rows = {doc['rows']} but the shards hold {m.rows}")
    if segments is None:
        check_layout(m)
    else:
        assert source is not None
        _check_segmented_layout(m, segments, source)
    return m


class _SegmentMemo:
    """Per lake handle: parsed segments by SHA-256 (their bytes were checked against it), the layout
    checks each passed (by hash and the lake's columns), per-segment row counts, and a lock for all of
    them (a segment may be first used from a prefetch thread). Segments are immutable and named by
    content hash in the version file, so all stay valid."""

    def __init__(self) -> None:
        self.lock = ForkSafeLock(reentrant=True)
        self.parsed: dict[str, tuple[ShardEntry, ...]] = {}
        self.checked: dict[tuple[object, ...], tuple[int, bool]] = {}
        self.rows: dict[str, Any] = {}
        # the last few format-3 version files parsed or published: name -> (bytes, key, manifest)
        self.version_files: dict[str, tuple[bytes, bytes | None, Manifest]] = {}
        self.reads = 0  # segment files read and parsed (tests count them)

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a pickled lake handle (a stream's workers) starts with an empty memo and its own lock

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def bound(self) -> None:
        if len(self.parsed) > _SEGMENT_MEMO_MAX:  # a bound, not an LRU: a long-lived writer of a huge lake
            self.parsed.clear()
            self.checked.clear()
            self.rows.clear()
            self.version_files.clear()


def _memo(fs: LakeFS | None) -> _SegmentMemo:
    """The `_SegmentMemo` of a lake handle (a fresh one without ``fs``)."""
    got = getattr(fs, "_m2m_segment_memo", None)
    if not isinstance(got, _SegmentMemo):
        got = _SegmentMemo()
        if fs is not None:
            fs._m2m_segment_memo = got  # type: ignore[attr-defined]
    return got


_SEGMENT_MEMO_MAX = 1 << 18  # parsed segments (of up to 256 shards each)


class _SegmentSource:
    """Loads and checks the segments of one format-3 version file on first use (`SegmentRef.entries`).

    A load reads the file (or takes its parsed entries from the handle's memo by SHA-256, whose bytes
    were checked when first read), checks the entries against the reference's summary and their layout
    (`_check_run`); when the version file's references lack ``geometry_rows`` (written before lazy
    segments), the geometry totals are checked when the last of its segments is loaded. Errors are
    `CorruptShardError` naming the version file and the segment."""

    def __init__(self, fs: LakeFS, lake_id: str | None, where: str) -> None:
        self.fs = fs
        self.lake_id = lake_id
        self.where = where
        self.memo = _memo(fs)
        self.main: frozenset[str] = frozenset()
        self.known: frozenset[str] = frozenset()
        self.manifest: Manifest | None = None
        self.pending: set[int] | None = None   # segments still to load before the deferred totals check
        self.covered: dict[int, tuple[int, bool]] = {}

    def bind(self, m: Manifest, defer_totals: bool, count: int) -> None:
        self.main, self.known = _columns(m)
        self.manifest = m
        self.pending = set(range(count)) if defer_totals else None

    def has(self, ref: SegmentRef) -> bool:
        return ref.sha256 in self.memo.parsed

    def load(self, ref: SegmentRef) -> tuple[ShardEntry, ...]:
        with self.memo.lock:
            if ref.loaded is not None:
                return ref.loaded
            try:
                entries = self._load(ref)
                if self.pending is not None and self.pending <= {ref.index}:
                    self._check_totals()  # before the last segment's entries are handed out
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                raise CorruptShardError(f"manifest {self.where} is corrupt: {what}") from exc
            if self.pending is not None:
                self.pending.discard(ref.index)
            object.__setattr__(ref, "loaded", entries)
            return entries

    def _load(self, ref: SegmentRef) -> tuple[ShardEntry, ...]:
        memo = self.memo
        entries = memo.parsed.get(ref.sha256)
        if entries is None:
            entries = _parse_segment(ref, _read_segment(self.fs, ref), self.lake_id)
            memo.reads += 1
            memo.bound()
            memo.parsed[ref.sha256] = entries
        rows = _rows_of(entries)
        if (len(entries), entries[0].id_min, entries[-1].id_max, rows) != (ref.shards, ref.id_min, ref.id_max, ref.rows):
            raise InvalidManifestError(f"segments[{ref.index}] ({ref.path}) holds {len(entries)} shards, ids "
                                       f"{entries[0].id_min}..{entries[-1].id_max}, {rows} rows; its reference "
                                       f"says {ref.shards}, {ref.id_min}..{ref.id_max}, {ref.rows}")
        key = (ref.sha256, self.main, self.known)
        got = memo.checked.get(key)
        if got is None:
            got = _check_run(entries, ref.first, self.main, self.known)
            memo.checked[key] = got
        if ref.geometry_rows is not None and got[0] != ref.geometry_rows:
            raise InvalidManifestError(f"segments[{ref.index}] ({ref.path}) holds {got[0]} rows with geometry "
                                       f"sidecars; its reference says {ref.geometry_rows}")
        self.covered[ref.index] = got
        return entries

    def _check_totals(self) -> None:
        assert self.manifest is not None
        got = self.covered.values()
        _check_geometry(self.manifest, sum(c for c, _ in got), any(e for _, e in got))


def _read_segment(fs: LakeFS, ref: SegmentRef) -> bytes:
    try:
        return fs.read_bytes(ref.path)
    except FileNotFoundError as exc:
        # (from the FileNotFoundError: `read_manifest` of the latest version tells a file vacuumed by a
        # newer commit from damage by it)
        raise InvalidManifestError(f"segment {ref.path} is missing (if `vacuum` ran since this reader opened its "
                                   "version, that version's files are gone: reopen the lake; else run `m2m verify`)") from exc


def load_segments(refs: Sequence[SegmentRef]) -> None:
    """Load every segment of ``refs`` (`SegmentRef.entries`); on an object store the files not yet
    in memory are read first, overlapped (one request per segment)."""
    todo = [r for r in refs if not r.is_loaded and r.source is not None]
    if len(todo) > 1 and not todo[0].source.fs.is_local:  # type: ignore[union-attr]
        from concurrent.futures import ThreadPoolExecutor

        def read(r: SegmentRef) -> None:
            src = r.source
            assert src is not None
            try:
                data = _read_segment(src.fs, r)
            except InvalidManifestError:
                return  # reported (typed, with the version file) by the load below
            with src.memo.lock:
                if r.sha256 not in src.memo.parsed:
                    try:
                        src.memo.parsed[r.sha256] = _parse_segment(r, data, src.lake_id)
                        src.memo.reads += 1
                    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                        return  # likewise

        with ThreadPoolExecutor(min(16, len(todo))) as pool:
            list(pool.map(read, todo))
    for r in refs:
        r.entries  # noqa: B018  (loads and checks)


def _segment_ref(doc: Any, i: int, source: _SegmentSource, first: int) -> SegmentRef:
    where = f"segments[{i}]."
    if not isinstance(doc, dict):
        raise InvalidManifestError(f"segments[{i}] is not an object")
    path = doc["path"]
    prefix, sep, name = path.partition("/") if isinstance(path, str) else ("", "", "")
    if prefix != SEGMENT_DIR or not sep or not _SEGMENT_NAME_RE.fullmatch(name):
        raise InvalidManifestError(f"segment path {path!r} is not {SEGMENT_DIR}/<32 hex digits>.json")
    sha = doc["sha256"]
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise InvalidManifestError(f"{where}sha256 {sha!r} is not 64 hex digits")
    geo = _int(doc, "geometry_rows", where=where) if "geometry_rows" in doc else None
    return SegmentRef(path=path, shards=_int(doc, "shards", 1, where=where), id_min=_int(doc, "id_min", where=where),
                      id_max=_int(doc, "id_max", where=where), rows=_int(doc, "rows", 1, where=where),
                      bytes=_int(doc, "bytes", 1, where=where), sha256=sha, geometry_rows=geo, source=source,
                      index=i, first=first)


_REF_KEYS = frozenset(("path", "shards", "id_min", "id_max", "rows", "bytes", "sha256", "geometry_rows"))


def _segment_ref_fast(doc: Any, i: int, source: _SegmentSource, first: int) -> SegmentRef:
    """`_segment_ref` for the common, valid reference (a version file lists hundreds); anything
    unusual goes to `_segment_ref`, which names the problem."""
    if type(doc) is not dict:
        return _segment_ref(doc, i, source, first)
    path, shards, lo, hi, rows, size, sha = (doc.get("path"), doc.get("shards"), doc.get("id_min"), doc.get("id_max"),
                                             doc.get("rows"), doc.get("bytes"), doc.get("sha256"))
    geo = doc.get("geometry_rows")
    if (type(path) is not str or len(path) != 47 or path[:10] != "_segments/"
            or _SEGMENT_NAME_RE.fullmatch(path, 10) is None or type(sha) is not str
            or _SHA256_RE.fullmatch(sha) is None or type(shards) is not int or type(lo) is not int
            or type(hi) is not int or type(rows) is not int or type(size) is not int
            or not (1 <= shards <= _I64_MAX and 0 <= lo <= _I64_MAX and 0 <= hi <= _I64_MAX
                    and 1 <= rows <= _I64_MAX and 1 <= size <= _I64_MAX)
            or (geo is not None and (type(geo) is not int or not 0 <= geo <= _I64_MAX))):
        return _segment_ref(doc, i, source, first)
    # the frozen dataclass's __init__ sets each field through object.__setattr__ (5x slower)
    ref = object.__new__(SegmentRef)
    ref.__dict__.update(path=path, shards=shards, id_min=lo, id_max=hi, rows=rows, bytes=size, sha256=sha,
                        loaded=None, geometry_rows=geo, source=source, index=i, first=first)
    return ref


def _segment_refs(doc: dict[str, Any], source: _SegmentSource) -> tuple[SegmentRef, ...]:
    """The segment references of a format-3 version file (no segment is read: see `_SegmentSource`)."""
    raw = doc["segments"]
    if not isinstance(raw, list):
        raise InvalidManifestError("segments is not a list")
    refs = []
    first = 0
    for i, g in enumerate(raw):
        r = _segment_ref_fast(g, i, source, first)
        refs.append(r)
        first += r.shards
    if len({r.path for r in refs}) != len(refs):
        raise InvalidManifestError("a segment is listed twice")
    return tuple(refs)


def _rows_of(entries: tuple[ShardEntry, ...]) -> int:
    return sum(map(operator.attrgetter("rows"), entries))


def _parse_segment(ref: SegmentRef, data: bytes, lake_id: str | None) -> tuple[ShardEntry, ...]:
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != ref.bytes or digest != ref.sha256:
        raise InvalidManifestError(f"segment {ref.path} has {len(data)} bytes with sha256 {digest}; the version file "
                                   f"says {ref.bytes} bytes, sha256 {ref.sha256}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidManifestError(f"segment {ref.path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != SEGMENT_FORMAT:
        raise InvalidManifestError(f"segment {ref.path} is not an m2m segment")
    if doc.get("lake_id") != lake_id:
        raise InvalidManifestError(f"segment {ref.path} belongs to lake {doc.get('lake_id')}, this lake is {lake_id}")
    shards = doc.get("shards")
    if not isinstance(shards, list) or not shards:
        raise InvalidManifestError(f"segment {ref.path} has no shards list")
    columns_ok: dict[tuple[Any, ...], tuple[str, ...]] = {}
    try:
        return tuple([_shard_fast(s, i, columns_ok) for i, s in enumerate(shards)])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise InvalidManifestError(f"segment {ref.path}: {what}") from exc


def segment_bytes(lake_id: str | None, entries: tuple[ShardEntry, ...]) -> bytes:
    """The bytes of a segment file holding ``entries`` (canonical JSON, one line)."""
    doc = {"format": SEGMENT_FORMAT, "lake_id": lake_id, "shards": [e.to_doc() for e in entries]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _check_stats(stats: dict[str, Any]) -> None:
    """The kappa/alpha summary has numbers where numbers belong (it is shown by `info`)."""
    for key in ("kappa", "alpha"):
        part = stats.get(key)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise InvalidManifestError(f"stats.{key} is not an object")
        for name, value in part.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if name == "count":
                ok = number and isinstance(value, int) and value >= 0
            else:
                ok = number or (value is None and name in ("min", "max"))
            if not ok:
                raise InvalidManifestError(f"stats.{key}.{name} = {value!r} is not a number")


def _shard_fast(doc: Any, i: int, columns_ok: dict[tuple[Any, ...], tuple[str, ...]]) -> ShardEntry:
    """`_shard` for the common, valid entry, with C-level checks (a segment of 100k entries is parsed
    when a lake is opened); anything unusual goes to `_shard`, which names the problem."""
    try:
        if type(doc) is not dict:
            return _shard(doc, i)
        rows, lo, hi, files = doc["rows"], doc["id_min"], doc["id_max"], doc["files"]
        if (type(rows) is not int or type(lo) is not int or type(hi) is not int or type(files) is not list
                or not files or not (1 <= rows <= _I64_MAX and 0 <= lo <= _I64_MAX and 0 <= hi <= _I64_MAX)):
            return _shard(doc, i)
        out = []
        for f in files:
            if type(f) is not dict:
                return _shard(doc, i)
            path, size, crc, cols = f["path"], f["bytes"], f["crc32"], f["columns"]
            if (type(path) is not str or path[:6] != "_data/" or _FILE_NAME_RE.fullmatch(path, 6) is None
                    or ".." in path or type(size) is not int or type(crc) is not int or not 0 <= size <= _I64_MAX
                    or not 0 <= crc < _U32 or type(cols) is not list):
                return _shard(doc, i)
            key = tuple(cols)
            columns = columns_ok.get(key)
            if columns is None:
                if not cols or set(map(type, cols)) != {str} or not all(cols) or len(set(cols)) != len(cols):
                    return _shard(doc, i)
                columns = columns_ok[key] = key
            bb, blocks, sha = f.get("block_bytes"), f.get("block_crc32c"), f.get("sha256")
            if sha is not None and (type(sha) is not str or _SHA256_RE.fullmatch(sha) is None):
                return _shard(doc, i)
            if bb is None and blocks is None:
                out.append(FileEntry(path, size, crc, columns, sha256=sha))
                continue
            if (type(bb) is not int or type(blocks) is not list or not 1 <= bb <= _I64_MAX
                    or len(blocks) != -(-size // bb) or (blocks and (set(map(type, blocks)) != {int}
                                                                    or min(blocks) < 0 or max(blocks) >= _U32))):
                return _shard(doc, i)
            out.append(FileEntry(path, size, crc, columns, bb, tuple(blocks), sha))
        return ShardEntry(rows, lo, hi, tuple(out))
    except (KeyError, TypeError):
        return _shard(doc, i)


def _shard(doc: Any, i: int) -> ShardEntry:
    where = f"shards[{i}]."
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list) or not doc["files"]:
        raise InvalidManifestError(f"shards[{i}] is not an object with a non-empty files list")
    return ShardEntry(rows=_int(doc, "rows", 1, where=where), id_min=_int(doc, "id_min", where=where),
                      id_max=_int(doc, "id_max", where=where),
                      files=tuple(_file(f, f"shards[{i}].files[{j}].") for j, f in enumerate(doc["files"])))


def _file(doc: Any, where: str) -> FileEntry:
    if not isinstance(doc, dict):
        raise InvalidManifestError(f"{where[:-1]} is not an object")
    path = check_file_path(doc["path"])
    columns = doc["columns"]
    if (not isinstance(columns, list) or not columns or not all(isinstance(c, str) and c for c in columns)
            or len(set(columns)) != len(columns)):
        raise InvalidManifestError(f"{where}columns of {path} is not a non-empty list of distinct names")
    block_bytes = doc.get("block_bytes")
    blocks = doc.get("block_crc32c")
    if (block_bytes is None) != (blocks is None):
        raise InvalidManifestError(f"{where}block_bytes and block_crc32c of {path} must both be present or both absent")
    if block_bytes is not None:
        _int(doc, "block_bytes", 1, where=where)
        if not isinstance(blocks, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < _U32 for c in blocks):
            raise InvalidManifestError(f"{where}block_crc32c of {path} is not a list of uint32")
        if len(blocks) != -(-_int(doc, "bytes", where=where) // block_bytes):
            raise InvalidManifestError(f"{where}{len(blocks)} block checksums of {block_bytes} bytes do not cover the "
                             f"{doc['bytes']} bytes of {path}")
    sha = doc.get("sha256")
    if sha is not None and (not isinstance(sha, str) or _SHA256_RE.fullmatch(sha) is None):
        raise InvalidManifestError(f"{where}sha256 of {path} is not 64 lowercase hex digits")
    return FileEntry(path=path, bytes=_int(doc, "bytes", where=where), crc32=_int(doc, "crc32", 0, _U32 - 1, where),
                     columns=tuple(columns), block_bytes=block_bytes,
                     block_crc32c=None if blocks is None else tuple(blocks), sha256=sha)


def check_layout(m: Manifest) -> None:
    """ValueError naming the first inconsistency between a manifest's own numbers and names.

    Shards hold >= 1 row, ``id_max - id_min + 1 >= rows`` (ids are unique), ranges ascend without
    overlap and stay below ``next_id``; every file path appears once; every shard's first file holds
    the main columns, the label (if any) and every metadata column; sidecars only hold known columns;
    geometry sidecars (``kappa``, ``neighbors`` and ``neighbor_cos`` together) cover shards holding
    ``geometry["rows"]`` rows (when recorded).
    """
    main, known = _columns(m)
    covered, estimated = _check_run(m.shards, 0, main, known)
    _check_totals(m, m.shards[-1].id_max if m.shards else -1, covered, estimated)


def _columns(m: Manifest) -> tuple[frozenset[str], frozenset[str]]:
    main = set(MAIN_COLUMNS) | set(m.metadata) | ({LABEL} if m.label_type is not None else set())
    return frozenset(main), frozenset(main | set(GEOMETRY_COLUMNS) | set(OPTIONAL_MAIN_COLUMNS) | set(NEIGHBOUR_TERMS))


def _check_run(shards: Sequence[ShardEntry], offset: int, main: frozenset[str],
               known: frozenset[str]) -> tuple[int, bool]:
    """`check_layout` within one run of shards (``offset``: the first one's index, for messages);
    returns the rows of the shards with geometry sidecars and whether there are any."""
    seen: set[str] = set()
    prev_max = -1
    covered = 0
    estimated = False
    for i, s in enumerate(shards, offset):
        if s.id_min > s.id_max or s.id_max - s.id_min + 1 < s.rows:
            raise InvalidManifestError(f"shards[{i}] has {s.rows} rows but ids [{s.id_min}, {s.id_max}]")
        if s.id_min <= prev_max:
            raise InvalidManifestError(f"shards[{i}] ids start at {s.id_min}, not after the previous shard's {prev_max} "
                             "(shards must ascend without overlap)")
        prev_max = s.id_max
        has_geometry = False
        for j, f in enumerate(s.files):
            if f.path in seen:
                raise InvalidManifestError(f"file {f.path} is listed twice")
            seen.add(f.path)
            cols = set(f.columns)
            if j == 0 and not main <= cols:
                raise InvalidManifestError(f"shards[{i}] first file {f.path} lacks columns {sorted(main - cols)}")
            if not cols <= known:
                raise InvalidManifestError(f"file {f.path} lists unknown columns {sorted(cols - known)}")
            geo = set(GEOMETRY_COLUMNS) & (cols if j else cols - {KAPPA})
            if geo and geo != set(GEOMETRY_COLUMNS):  # estimate_kappa writes all three together
                raise InvalidManifestError(f"file {f.path} lists {sorted(geo)} but not all of {list(GEOMETRY_COLUMNS)}")
            terms = set(NEIGHBOUR_TERMS) & cols
            if terms and (j == 0 or NEIGHBORS not in cols or not {NEIGHBOR_KAPPA, NEIGHBOR_ALPHA} <= terms):
                raise InvalidManifestError(f"file {f.path} lists {sorted(terms)} outside a geometry sidecar with "
                                           f"{NEIGHBOR_KAPPA} and {NEIGHBOR_ALPHA}")
            has_geometry = has_geometry or NEIGHBORS in cols
        if has_geometry:
            estimated = True
            covered += s.rows
    return covered, estimated


def _check_totals(m: Manifest, last_id: int, covered: int, estimated: bool) -> None:
    if last_id >= m.next_id:
        raise InvalidManifestError(f"next_id {m.next_id} is not above the largest id {last_id}")
    _check_geometry(m, covered, estimated)


def _check_geometry(m: Manifest, covered: int, estimated: bool) -> None:
    if estimated and m.geometry is None:
        raise InvalidManifestError("shards have geometry sidecars but the manifest has no geometry")
    if m.geometry is not None and "rows" in m.geometry:
        # estimate_kappa gives every shard a sidecar; later appends add shards without (remote appends
        # with reserved ids may land between estimated shards, so no order is implied)
        if covered != m.geometry["rows"]:
            raise InvalidManifestError(f"geometry covers {m.geometry['rows']} rows but the shards with sidecars hold {covered}")


def _check_segmented_layout(m: Manifest, segments: tuple[SegmentRef, ...], source: _SegmentSource) -> None:
    """`check_layout` of a format-3 manifest, as far as the references tell: the order of the
    segments, next_id above the last id and (references with ``geometry_rows``) the geometry totals;
    then the last segment is loaded (its tail is what the next append follows). Every other segment's
    entries are checked when first used (`_SegmentSource.load`), the geometry totals of references
    without ``geometry_rows`` when the last of them is loaded.

    A file path is unique within its segment; one listed in two segments is refused when it is read
    (its ids match one shard only, `m2m.lake.integrity`)."""
    prev_max = -1
    for i, g in enumerate(segments):
        if g.id_min <= prev_max:
            raise InvalidManifestError(f"segments[{i}] ({g.path}) ids start at {g.id_min}, not after the previous "
                                       f"segment's {prev_max} (a segment swapped, repeated or moved?)")
        if g.id_max < g.id_min:
            raise InvalidManifestError(f"segments[{i}] ({g.path}) ids {g.id_min}..{g.id_max} do not ascend")
        prev_max = g.id_max
    if prev_max >= m.next_id:
        raise InvalidManifestError(f"next_id {m.next_id} is not above the largest id {prev_max}")
    geo = [g.geometry_rows for g in segments]
    complete = all(v is not None for v in geo)
    if complete:
        covered = sum(v for v in geo if v is not None)
        _check_geometry(m, covered, covered > 0)
    source.bind(m, defer_totals=not complete, count=len(segments))
    if segments:
        segments[-1].entries  # noqa: B018  (loads and checks the last segment now)


def manifest_name(version: int) -> str:
    return f"{MANIFEST_DIR}/v{version:010d}.json"


def list_versions(fs: LakeFS) -> list[int]:
    """Committed versions, ascending (temp files and manifests moved aside by `repair` are ignored).

    A local entry so named that is not a regular file (a FIFO would block the read forever, a
    directory cannot be read) is skipped with a warning (`stray_entry`).
    """
    out = []
    regular: set[str] = set()
    try:
        if fs.is_local:
            # the directory entries' own types: a regular file needs no stat (one stat per version made
            # every commit and open O(versions): 1,007 stats per append of a 1,000-version lake, 2026-12-08)
            try:
                with os.scandir(fs.local_path(MANIFEST_DIR)) as it:
                    entries = list(it)
            except FileNotFoundError:
                entries = []
            names = sorted(e.name for e in entries)
            regular = {e.name for e in entries if e.is_file(follow_symlinks=False)}
        else:
            names = fs.listdir(MANIFEST_DIR)
    except NotADirectoryError:  # the lake's path (or its _manifests) is a file: not "[Errno 20] ..."
        what = fs.root if not os.path.isdir(fs.root) else f"{fs.root}/{MANIFEST_DIR}"
        raise LakeNotFoundError(f"no m2m lake at {fs.url}: {what} is a file, not a folder") from None
    for name in names:
        m = _MANIFEST_RE.fullmatch(name)
        if m is None:
            continue
        if fs.is_local and name not in regular:
            stray = stray_entry(fs, f"{MANIFEST_DIR}/{name}")
            if stray is not None:
                if stray != "gone":
                    logger.warning("skipping %s/%s/%s: %s, not a manifest", fs.root, MANIFEST_DIR, name, stray)
                continue
        out.append(int(m.group(1)))
    return sorted(out)


def stray_versions(fs: LakeFS) -> list[tuple[int, str, str]]:
    """(version, path, what) of the local entries named like a manifest that are not one (`stray_entry`)."""
    out = []
    for name in fs.listdir(MANIFEST_DIR):
        m = _MANIFEST_RE.fullmatch(name)
        what = None if m is None else stray_entry(fs, f"{MANIFEST_DIR}/{name}")
        if m is not None and what is not None and what != "gone":
            out.append((int(m.group(1)), f"{MANIFEST_DIR}/{name}", what))
    return sorted(out)


def stray_entry(fs: LakeFS, rel: str) -> str | None:
    """What the local entry ``rel`` named like a manifest is when it is not a (link to a) regular file:
    "a folder", "a FIFO", "a special file", "a symbolic link to nothing", or "gone" (removed since it was
    listed); None for a regular file. Readers skip such an entry; a commit of its version cannot
    be published over it (`write_manifest` names it) and `m2m repair` moves it aside."""
    path = fs.local_path(rel)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a symbolic link to nothing" if os.path.islink(path) else "gone"
    if stat.S_ISREG(mode):
        return None
    return "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"


def use_key(fs: LakeFS, configured: str | bytes | None) -> None:
    """Read and write the lake at ``fs`` with ``configured`` as its signing key (None: ``$M2M_LAKE_KEY``)."""
    # lake_key is set per instance on the concrete fs, not part of the LakeFS protocol
    fs.lake_key = lake_key(configured)  # type: ignore[attr-defined]


def key_of(fs: LakeFS) -> bytes | None:
    """The signing key a lake is read and written with (set on its fs by `open_lake`/`create_m2m`)."""
    key = getattr(fs, "lake_key", None)
    return key if key is not None else lake_key()


#: Times `read_manifest` of the latest version reads a newer one after the files of the one it listed vanished
LATEST_RETRIES = 3


def read_manifest(fs: LakeFS, version: int | None = None) -> Manifest:
    """The manifest of ``version`` (default: the latest). `LakeNotFoundError` when there is no lake.

    An unreadable manifest raises `CorruptShardError` naming it; for the latest version the message
    also names the newest older version and the recovery commands. The latest version's files may
    vanish while they are read (a writer published a newer version and vacuumed this one): the newer
    head is then read, a bounded number of times, rather than a healthy lake called damaged or absent.
    """
    attempt = 0
    while True:
        versions = list_versions(fs)
        try:
            return read_listed(fs, version, versions)
        except (LakeNotFoundError, CorruptShardError) as exc:
            # (an empty listing: every manifest listed was vacuumed before its entry was checked)
            if version is not None or attempt == LATEST_RETRIES or (versions and not _vanished(exc)):
                raise
            newer = list_versions(fs)
            if not newer or (versions and newer[-1] <= versions[-1]):
                raise
            attempt += 1


def _vanished(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a file that was not found (here a moment ago, or listed)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FileNotFoundError):
            return True
        seen = seen.__cause__
    return False


def read_listed(fs: LakeFS, version: int | None, versions: list[int]) -> Manifest:
    """`read_manifest` given the listing ``versions`` (`list_versions`): a loop over many versions
    lists once (listing per version made `m2m repair` quadratic in the versions, 2026-12-08)."""
    if not versions:
        raise LakeNotFoundError(f"no m2m lake at {fs.url} (no {MANIFEST_DIR}/ manifests)")
    latest = version is None
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise LakeNotFoundError(f"lake {fs.url} has no version {version} (versions: {versions[0]}..{versions[-1]})")
    rel = manifest_name(version)
    try:
        try:
            data = fs.read_bytes(rel)
        except FileNotFoundError as exc:   # listed a moment ago: vacuumed since
            raise LakeNotFoundError(f"lake {fs.url} has no version {version} any more (vacuumed while it was "
                                    "read)") from exc
        m = _read_version_file(fs, rel, data)
        if m.version != version:
            raise CorruptShardError(f"manifest {fs.url}/{rel} is corrupt: it says version {m.version}")
        if m.format_version < FORMAT_VERSION:
            _check_no_downgrade(fs, m, [v for v in versions if v < version])
        return m
    except CorruptShardError as exc:
        older = [v for v in versions if v < version]
        if not latest or not older:
            raise
        raise CorruptShardError(
            f"{exc}; older versions are still readable (e.g. open_lake(path, version={older[-1]})); to recover, "
            f"`m2m rollback {fs.url} --to {older[-1]}` commits a copy of version {older[-1]} as the newest, or "
            f"`m2m repair {fs.url}` moves the unreadable manifest aside") from exc


def _read_version_file(fs: LakeFS, rel: str, data: bytes) -> Manifest:
    """`Manifest.from_json` of the version file ``rel``; format 3: the same bytes under the same key
    as the last version file this handle parsed or published give that manifest again (it passed
    every check; its segments are immutable and load as before), so a writer's next commit does not
    parse its own version file again."""
    key = key_of(fs)
    memo = _memo(fs)
    with memo.lock:
        got = memo.version_files.get(rel)
    if got is not None and got[0] == data and got[1] == key:
        return got[2]
    m = Manifest.from_json(data, f"{fs.url}/{rel}", key, fs)
    if m.format_version >= 3:
        _remember_version_file(memo, rel, data, key, m)
    return m


def _remember_version_file(memo: _SegmentMemo, rel: str, data: bytes, key: bytes | None, m: Manifest) -> None:
    with memo.lock:
        if len(memo.version_files) >= 4:
            memo.version_files.pop(next(iter(memo.version_files)))
        memo.version_files[rel] = (data, key, m)


def _check_no_downgrade(fs: LakeFS, m: Manifest, older: list[int]) -> None:
    """An old-format manifest is refused when the version before it was newer (a downgrade edit
    that drops the checksum); only read for old-format manifests, so opening a current lake pays nothing."""
    if not older:
        return
    try:
        prev = json.loads(fs.read_bytes(manifest_name(older[-1])))
    except (OSError, ValueError):
        return  # that manifest's own problems are reported when it is read
    fv = prev.get("format_version") if isinstance(prev, dict) else None
    if isinstance(fv, int) and not isinstance(fv, bool) and fv > m.format_version:
        raise CorruptShardError(f"manifest {fs.url}/{manifest_name(m.version)} is corrupt: format_version "
                                f"{m.format_version} after a format-{fv} version {older[-1]} (a format downgrade)")


def added_shards(base: Manifest, new: Manifest) -> list[ShardEntry]:
    """The shard entries of ``new`` that may not be entries of ``base`` (object for object): what a
    commit built on ``base`` added, whose files it must make durable. For a segmented ``base`` that
    ``new`` derives from, the shards outside the segments ``new`` reuses (`plan_segments`), so the
    cost follows the change, not the lake."""
    if new.segments is not None and new.segments is base.segments and base.format_version >= 3:
        return plan_segments(new)[1]
    old = set(map(id, base.shards))
    by_id = dict(zip(map(id, new.shards), new.shards))
    return [by_id[k] for k in by_id.keys() - old]


def load_all(shards: Shards) -> Shards:
    """``shards`` with every entry loaded and checked (`ShardList.load`; a tuple as it is)."""
    return shards.load() if isinstance(shards, ShardList) else shards


def exact_segments(m: Manifest) -> tuple[SegmentRef, ...] | None:
    """``m.segments`` when they hold exactly ``m.shards`` (a manifest as read or published), else None."""
    segs = m.segments
    if segs is None:
        return None
    shards = m.shards
    if isinstance(shards, ShardList):
        parts = shards.parts
        if len(parts) == len(segs) and all(a is b for a, b in zip(parts, segs)):
            return segs  # as read: no segment needs loading to tell
    if sum(g.shards for g in segs) != len(shards):
        return None
    load_segments(segs)
    at = 0
    for g in segs:
        n = len(g.entries)
        if shards[at:at + n] != g.entries:
            return None
        at += n
    return segs


def shard_row_counts(fs: LakeFS, m: Manifest) -> Any:
    """The rows of each shard of ``m`` as an int64 numpy array (format 3: per segment, memoised;
    every segment is loaded and checked)."""
    import numpy as np

    segs = exact_segments(m)
    if not segs:
        return np.fromiter((s.rows for s in m.shards), dtype=np.int64, count=len(m.shards))
    memo = _memo(fs)
    load_segments(segs)
    parts = []
    for g in segs:
        got: Any = memo.rows.get(g.sha256)
        if got is None:
            got = np.fromiter(map(operator.attrgetter("rows"), g.entries), np.int64, count=len(g.entries))
            memo.rows[g.sha256] = got
        parts.append(got)
    return np.concatenate(parts)


def segments_wanted(fs: LakeFS, manifest: Manifest) -> bool:
    """Whether ``manifest`` is written as format 3 (segments): once its lake has more shards than one
    segment holds, and ever after (a lake that had format 3 never goes back to 2, which readers
    refuse as a downgrade: for a small lake the parent version file's format is read to know)."""
    if len(manifest.shards) > SEGMENT_SHARDS or manifest.segments is not None:
        return True
    if manifest.parent is None:
        return False
    try:
        prev = json.loads(fs.read_bytes(manifest_name(manifest.parent)))
    except (OSError, ValueError):
        return False  # the parent was read by this commit's caller; a vanished one has no say
    fv = prev.get("format_version") if isinstance(prev, dict) else None
    return isinstance(fv, int) and not isinstance(fv, bool) and fv >= 3


def plan_segments(manifest: Manifest) -> tuple[list[SegmentRef | tuple[ShardEntry, ...]], list[ShardEntry]]:
    """How ``manifest.shards`` are cut into segments: runs that equal a segment of
    ``manifest.segments`` (object for object) reuse it, the other shards go to new segments of at most
    `SEGMENT_SHARDS` (a new run after a segment that is not full is merged into a rewrite of it).
    Returns the list (a `SegmentRef` to reuse, or the entries of a segment to write) and the shards
    that are in no reused or rewritten segment (what the commit added, or moved).

    Shards kept as a `ShardList` of ``manifest.segments`` plus new entries (an append) are planned
    from its parts: only a segment that is rewritten is loaded."""
    shards = manifest.shards
    out: list[SegmentRef | tuple[ShardEntry, ...]] = []
    pending: list[ShardEntry] = []
    fresh: list[ShardEntry] = []

    def flush() -> None:
        if not pending:
            return
        if out and isinstance(out[-1], SegmentRef) and out[-1].shards < SEGMENT_SHARDS:
            pending[:0] = out.pop().entries  # type: ignore[union-attr]
        for lo in range(0, len(pending), SEGMENT_SHARDS):
            out.append(tuple(pending[lo:lo + SEGMENT_SHARDS]))
        pending.clear()

    if isinstance(shards, ShardList):
        ours = {id(g) for g in manifest.segments or ()}
        for p in shards.parts:
            if isinstance(p, SegmentRef) and id(p) in ours:
                flush()
                out.append(p)
            else:
                run = p.entries if isinstance(p, SegmentRef) else p
                pending.extend(run)
                fresh.extend(run)
        flush()
        return out, fresh
    # a segment not loaded holds no entry of ``shards`` (entries are objects of a loaded segment, or new)
    reuse = {id(g.entries[0]): g for g in (manifest.segments or ()) if g.is_loaded and g.entries}
    i = 0
    while i < len(shards):
        g = reuse.get(id(shards[i]))
        if g is not None and shards[i:i + len(g.entries)] == g.entries:
            flush()
            out.append(g)
            i += len(g.entries)
        else:
            pending.append(shards[i])
            fresh.append(shards[i])
            i += 1
    flush()
    return out, fresh


def _geometry_rows(entries: Sequence[ShardEntry]) -> int:
    """Rows of the shards of ``entries`` that have a geometry sidecar (as `_check_run` counts them)."""
    return sum(e.rows for e in entries if any(NEIGHBORS in f.columns for f in e.files))


def missing_file(fs: LakeFS, rels: Iterable[str]) -> str | None:
    """The first of ``rels`` the lake no longer has (one existence check each), or None. What a commit
    wrote outside the lock can be gone by its commit point: a vacuum with ``min_age_s=0`` took it."""
    return next((rel for rel in rels if not fs.exists(rel)), None)


def write_manifest(fs: LakeFS, manifest: Manifest, must_exist: Sequence[str] = ()) -> Manifest:
    """Publish ``manifest`` (the commit point) with a create-if-absent write: never replaces a version.

    Format 3 (`segments_wanted`): the new segment files are written first, each under a fresh random
    name (unreferenced until the version file exists: a crash leaves them to `Lake.vacuum`), then the
    version file. Returns the published manifest (with its ``segments``; its shards a `ShardList`
    over them). A reused reference without ``geometry_rows`` (a version file written before them)
    has its segment loaded and is published with them, so later opens check the totals from the
    references alone. `CommitConflictError` when another writer published this version first
    (`m2m.lake.commit` rebases).

    On an object store ``must_exist`` (the files this commit wrote) and the new segments are checked
    right before the version put: no lock keeps a vacuum with ``min_age_s=0`` from removing a running
    commit's files (observed: a compaction and an append each published a version whose files were
    gone); a missing one is `CommitConflictError`, nothing published (a retry writes the segments
    again; a missing shard file has ``final`` set: no retry brings it back).
    """
    rel = manifest_name(manifest.version)
    key = key_of(fs)
    segments: tuple[SegmentRef, ...] | None = None
    new_at: list[int] = []
    if segments_wanted(fs, manifest):
        plan, _ = plan_segments(manifest)
        load_segments([g for g in plan if isinstance(g, SegmentRef) and g.geometry_rows is None])
        memo = _memo(fs)
        made: list[SegmentRef] = []
        for g in plan:
            if isinstance(g, tuple):
                data = segment_bytes(manifest.lake_id, g)
                path = f"{SEGMENT_DIR}/{uuid.uuid4().hex}.json"
                if fs.is_local:
                    fs.makedirs(SEGMENT_DIR)
                fs.write_atomic(path, data)
                g = SegmentRef(path=path, shards=len(g), id_min=g[0].id_min, id_max=g[-1].id_max,
                               rows=sum(e.rows for e in g), bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               loaded=g, geometry_rows=_geometry_rows(g))
                with memo.lock:
                    memo.parsed[g.sha256] = g.entries
                new_at.append(len(made))
            elif g.geometry_rows is None:
                g = SegmentRef(g.path, g.shards, g.id_min, g.id_max, g.rows, g.bytes, g.sha256, g.entries,
                               _geometry_rows(g.entries))
            made.append(g)
        segments = tuple(made)
    data = manifest.to_json(key, segments)
    # never publish what readers would refuse (segments: the new ones checked from the memo, not read back)
    published = Manifest.from_json(data, f"{fs.url}/{rel} (not written)", key, fs)
    for i in new_at:
        assert published.segments is not None
        published.segments[i].entries  # noqa: B018  (loads from the memo: every check of the new segment)
    if not fs.is_local:
        written = [] if published.segments is None else [published.segments[i].path for i in new_at]
        lost = missing_file(fs, [*must_exist, *written])
        if lost is not None:
            gone = CommitConflictError(f"version {manifest.version} of {fs.url}: its new file {lost} was removed "
                                       "before the commit (by a vacuum with min_age_s=0 while it ran?); nothing "
                                       "was published")
            gone.final = lost in must_exist  # type: ignore[attr-defined]  # a retry cannot bring it back
            raise gone
    if not fs.create_exclusive(rel, data):
        what = stray_entry(fs, rel) if fs.is_local else None
        if what is not None and what != "gone":  # not a version: no writer will ever get past it
            raise CorruptShardError(f"cannot commit version {manifest.version}: {fs.url}/{rel} is {what}, not a "
                                    f"manifest (readers skip it); `m2m repair {fs.url}` moves it aside")
        raise CommitConflictError(f"version {manifest.version} of {fs.url} was committed by another writer")
    if published.segments is None:
        out = replace(manifest, segments=None, format_version=published.format_version)
    else:
        for g in published.segments[:1]:
            if g.source is not None:  # later loads name the version file as written
                g.source.where = f"{fs.url}/{rel}"
        out = replace(manifest, shards=ShardList(published.segments), segments=published.segments,
                      format_version=published.format_version)
    object.__setattr__(out, "_rows", published.rows)  # the memo `replace` dropped
    if published.segments is not None:  # the next commit on this handle reads these bytes as its base
        _remember_version_file(_memo(fs), rel, data, key, published)
    return out


def published_bytes(fs: LakeFS, manifest: Manifest) -> bytes:
    """The version file bytes ``manifest`` (as returned by `write_manifest`) was published with."""
    segments = manifest.segments if manifest.format_version >= 3 else None
    return manifest.to_json(key_of(fs), segments)
