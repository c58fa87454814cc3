"""Snapshot manifests: one immutable JSON file per lake version, written last and atomically."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from m2m.errors import CommitConflictError, CorruptShardError, LakeNotFoundError
from m2m.lake.fs import LakeFS

FORMAT_NAME = "m2m-lake"
FORMAT_VERSION = 1
MANIFEST_DIR = "_manifests"
DATA_DIR = "_data"
_MANIFEST_RE = re.compile(r"^v(\d{10})\.json$")


@dataclass(frozen=True)
class FileEntry:
    """One immutable Arrow IPC file holding some columns of a shard."""

    path: str
    bytes: int
    crc32: int
    columns: tuple[str, ...]
    # per-block crc32c of the file cut into ``block_bytes``-byte blocks (the last may be shorter):
    # checked on every read from disk by the stream; None in files written before they existed
    block_bytes: int | None = None
    block_crc32c: tuple[int, ...] | None = None


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
        raise KeyError(column)


@dataclass(frozen=True)
class Manifest:
    """The full description of one lake version."""

    version: int
    dim: int
    dtype: str
    next_id: int
    shards: tuple[ShardEntry, ...]
    label_type: str | None = None
    label_vocabulary: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    geometry: dict[str, Any] | None = None
    operation: dict[str, Any] = field(default_factory=dict)
    parent: int | None = None
    created: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for s in self.shards for f in s.files)

    def files(self) -> list[FileEntry]:
        return [f for s in self.shards for f in s.files]

    def next(self, **changes: Any) -> "Manifest":
        """The manifest of the next version, derived from this one."""
        return replace(self, version=self.version + 1, parent=self.version, created=time.time(), **changes)

    def to_json(self) -> bytes:
        doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes, where: str) -> "Manifest":
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT_NAME:
                raise ValueError(f"not an m2m manifest (format={doc.get('format')!r})")
            if doc["format_version"] > FORMAT_VERSION:
                raise ValueError(f"format_version {doc['format_version']} is newer than this m2m reads "
                                 f"({FORMAT_VERSION}); upgrade m2m")
            shards = tuple(
                ShardEntry(rows=int(s["rows"]), id_min=int(s["id_min"]), id_max=int(s["id_max"]),
                           files=tuple(FileEntry(path=f["path"], bytes=int(f["bytes"]), crc32=int(f["crc32"]),
                                                 columns=tuple(f["columns"]), **_block_fields(f))
                                       for f in s["files"]))
                for s in doc["shards"])
            return Manifest(
                version=int(doc["version"]), dim=int(doc["dim"]), dtype=str(doc["dtype"]),
                next_id=int(doc["next_id"]), shards=shards, label_type=doc.get("label_type"),
                label_vocabulary=tuple(doc.get("label_vocabulary") or ()), metadata=dict(doc.get("metadata") or {}),
                geometry=doc.get("geometry"), operation=dict(doc.get("operation") or {}),
                parent=doc.get("parent"), created=float(doc.get("created", 0.0)), stats=dict(doc.get("stats") or {}))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptShardError(f"manifest {where} is unreadable: {exc}") from exc


def _block_fields(f: dict[str, Any]) -> dict[str, Any]:
    """The optional per-block checksums of a file entry (absent in older manifests)."""
    if f.get("block_bytes") is None or f.get("block_crc32c") is None:
        return {}
    size, crcs = int(f["block_bytes"]), tuple(int(c) for c in f["block_crc32c"])
    if size <= 0 or len(crcs) != -(-int(f["bytes"]) // size):
        raise ValueError(f"file {f['path']!r}: {len(crcs)} block checksums of {size} bytes "
                         f"do not cover its {f['bytes']} bytes")
    return {"block_bytes": size, "block_crc32c": crcs}


def manifest_name(version: int) -> str:
    return f"{MANIFEST_DIR}/v{version:010d}.json"


def list_versions(fs: LakeFS) -> list[int]:
    """Committed versions, ascending (temp files of interrupted commits are ignored)."""
    out = []
    for name in fs.listdir(MANIFEST_DIR):
        m = _MANIFEST_RE.match(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def read_manifest(fs: LakeFS, version: int | None = None) -> Manifest:
    """The manifest of ``version`` (default: the latest). `LakeNotFoundError` when there is no lake."""
    versions = list_versions(fs)
    if not versions:
        raise LakeNotFoundError(f"no m2m lake at {fs.root} (no {MANIFEST_DIR}/ manifests)")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise LakeNotFoundError(f"lake {fs.root} has no version {version} (versions: {versions[0]}..{versions[-1]})")
    rel = manifest_name(version)
    return Manifest.from_json(fs.read_bytes(rel), f"{fs.root}/{rel}")


def write_manifest(fs: LakeFS, manifest: Manifest) -> None:
    """Publish ``manifest`` (the commit point) with a create-if-absent write: never replaces a version.

    `CommitConflictError` when another writer published this version first (`m2m.lake.commit` rebases).
    """
    rel = manifest_name(manifest.version)
    if not fs.create_exclusive(rel, manifest.to_json()):
        raise CommitConflictError(f"version {manifest.version} of {fs.root} was committed by another writer")
