"""Recovery of a lake whose newest version is unreadable or wrong: nothing is ever deleted.

- `rollback(path, to)` commits a copy of version ``to`` as the newest version (the versions in
  between stay on disk and readable by number). ``next_id`` never goes back, so ids handed out by
  the abandoned versions are not reused.
- `repair(path)` moves unreadable newest manifests aside (``v0000000007.json`` becomes
  ``v0000000007.json.corrupt-<unix time>``, which no reader lists) and commits a copy of the newest
  readable version above them (with an ``id_floor`` when the moved versions had handed out ids
  beyond it), and reports every unreadable manifest it saw.

Neither ever reuses a version number or an id: a version moved aside may have been read (a stream
state or a reader pinned to version 7 must not find another version 7), and the ids a newer version
states may have been seen, even when that version is now unreadable.

Both run under the lake's write lock. Unreferenced data files are left for `Lake.vacuum`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Iterator

from m2m._validate import check_int
from m2m.errors import CorruptShardError, LakeNotFoundError, SignatureError
from m2m.lake.fs import LakeFS, open_fs
from m2m.lake.manifest import (
    FORMAT_VERSION,
    Manifest,
    list_versions,
    load_all,
    manifest_name,
    read_listed,
    read_manifest,
    stray_versions,
    write_manifest,
)


@contextlib.contextmanager
def _fs(path: str | os.PathLike[str] | LakeFS, storage_options: dict[str, Any] | None) -> Iterator[LakeFS]:
    """The lake's filesystem; one opened here is closed after (a remote one's private shard cache goes
    with it: every rollback and repair of an s3:// lake left an m2m-cache-* folder in the temp dir)."""
    if not isinstance(path, (str, os.PathLike)):
        yield path
        return
    fs = open_fs(path, storage_options)
    try:
        yield fs
    finally:
        getattr(fs, "close", lambda: None)()


@contextlib.contextmanager
def _lake_locked(fs: LakeFS, take: bool = True) -> Iterator[None]:
    """The lake's write lock (``take``), taken only once ``fs`` holds a lake: on a folder that is none
    the lock file was created there (``m2m repair photos/`` left ``photos/_lock``) and a missing path
    gave the lock's raw errno (observed)."""
    from m2m.lake.lake import write_lock

    try:
        found = list_versions(fs)
    except (NotADirectoryError, FileNotFoundError):
        found = []
    if not found:
        raise LakeNotFoundError(f"no m2m lake at {fs.url}")
    if not take:
        yield
        return
    with write_lock(fs):
        yield


def _check_files(fs: LakeFS, m: Manifest) -> None:
    """Every file of ``m`` is present and matches its entry (footers; a remote lake: presence only)."""
    from m2m.lake.integrity import check_footers

    if fs.is_local:
        check_footers(fs, m)
        return
    for f in m.files():
        if not fs.exists(f.path):
            raise CorruptShardError(f"shard file {f.path} of version {m.version} is missing")


def rollback(path: str | os.PathLike[str] | LakeFS, to: int,
             storage_options: dict[str, Any] | None = None) -> Manifest:
    """Commit a copy of version ``to`` as the newest version and return its manifest.

    ``to`` must be readable and its files present (`CorruptShardError` otherwise); when it is
    already the newest version nothing is written.
    """
    to = check_int(to, "to", 0)
    with _fs(path, storage_options) as fs, _lake_locked(fs):
        versions = list_versions(fs)
        if not versions:
            raise LakeNotFoundError(f"no m2m lake at {fs.url}")
        if to not in versions:
            raise LakeNotFoundError(f"lake {fs.url} has no version {to} (versions: {versions[0]}..{versions[-1]})")
        target = read_manifest(fs, to)
        latest = versions[-1]
        if to == latest:
            return target
        _check_files(fs, target)
        next_id = max(target.next_id, _stamped_next_id(fs, target))
        for v in versions:
            if v > to:
                try:
                    next_id = max(next_id, read_listed(fs, v, versions).next_id)
                except (CorruptShardError, SignatureError):
                    # unreadable now (a broken segment, a flipped byte) but it may have been read: the
                    # next_id its JSON states, if any (0 when the file is no JSON)
                    next_id = max(next_id, _stated_next_id(fs, manifest_name(v)))
        new = _republish(fs, target, latest, next_id, {"type": "rollback", "to": to, "from": latest})
    return new


def _republish(fs: LakeFS, base: Manifest, latest: int, next_id: int, operation: dict[str, Any],
               parent: int | None = None) -> Manifest:
    """Commit a copy of ``base`` as version ``latest + 1`` that hands out ids from ``next_id`` on (an
    ``id_floor`` when that is beyond ``base``'s own: ids abandoned versions handed out stay unused);
    its parent is ``parent`` (default ``latest``: the version below it that exists)."""
    new = dataclasses.replace(base, version=latest + 1, parent=latest if parent is None else parent,
                              created=time.time(),
                              format_version=FORMAT_VERSION, next_id=next_id,
                              id_floor=max(base.id_floor, next_id if next_id > base.next_id else 0),
                              operation=operation)
    return write_manifest(fs, new)


def repair(path: str | os.PathLike[str] | LakeFS, dry_run: bool = False,
           storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move the unreadable newest manifests aside and commit a copy of the newest readable version
    above them; returns what was found and done.

    The copy takes the version after the highest one moved aside (a moved version may have been
    read: its number is not handed out again), and when a moved version states a `next_id` beyond the
    readable one's, the copy has that `id_floor`. Keys: ``moved`` (``[(version, new name, problem)]``),
    ``unreadable`` (older unreadable versions, left in place: ``[(version, problem)]``), ``head`` (the
    lake's newest version afterwards: the copy, or the readable version when nothing was moved),
    ``restored`` (the readable version the head is, or a copy of), ``id_floor`` (the floor committed,
    or None). `CorruptShardError` (and nothing moved) when no version is readable.
    """
    # a dry run moves nothing: no lock (it failed on a read-only lake, where verify works)
    with _fs(path, storage_options) as fs, _lake_locked(fs, take=not dry_run):
        versions = list_versions(fs)
        if not versions:
            raise LakeNotFoundError(f"no m2m lake at {fs.url}")
        problems: dict[int, str] = {}
        for v in versions:
            try:
                load_all(read_listed(fs, v, versions).shards)  # format 3: every segment, not only what an open reads
            except (CorruptShardError, SignatureError) as exc:
                # a signed lake's version whose signature fails (a planted or forged manifest) is moved aside
                # like a damaged one; with no key or another key no version passes and nothing moves
                problems[v] = str(exc)
        readable = [v for v in versions if v not in problems]
        if not readable:
            raise CorruptShardError(f"no version of the lake at {fs.url} is readable; nothing was moved "
                                    f"(first problem: {problems[versions[-1]]})")
        head = readable[-1]
        moved = []
        stamp = int(time.time())
        corrupt = [v for v in versions if v > head]
        # the highest next_id a moved version file states, or its appends' shard files do (a file cut
        # short states none): its ids may have been seen
        handed_out = max([_stated_next_id(fs, manifest_name(v)) for v in corrupt], default=0)
        if corrupt:
            handed_out = max(handed_out, _stamped_next_id(fs, read_manifest(fs, head)))
        if fs.is_local:  # a folder or dangling link where a newer manifest would go blocks every commit
            for v, rel, what in stray_versions(fs):
                if v > head:
                    aside = f"{rel}.stray-{stamp}"
                    if not dry_run:
                        os.rename(fs.local_path(rel), fs.local_path(aside))  # the entry itself, never a link's target
                    moved.append((v, aside, f"{fs.url}/{rel} is {what}, not a manifest"))
        restored, floor = head, None
        if corrupt:
            top = corrupt[-1]
            base = read_manifest(fs, head)
            floor = handed_out if handed_out > base.next_id else None
            if not dry_run:
                # the copy is committed before anything is moved aside: a repair killed in between left the
                # lake at its old readable head with the bad versions gone, and the next commit reused their
                # version numbers and ids (observed); now it leaves them below a readable head, as older
                # unreadable versions, and nothing is handed out again
                _republish(fs, base, top, max(base.next_id, handed_out),
                           {"type": "repair", "restored": head, "moved": corrupt,
                            **({} if floor is None else {"id_floor": floor})}, parent=head)
            for v in corrupt:
                rel = manifest_name(v)
                aside = f"{rel}.corrupt-{stamp}"
                if not dry_run:
                    fs.write_atomic(aside, fs.read_bytes(rel))
                    fs.remove(rel)
                moved.append((v, aside, problems[v]))
            head = top + 1
    return {"moved": moved, "unreadable": [(v, p) for v, p in problems.items() if v < restored], "head": head,
            "restored": restored, "dry_run": dry_run, "id_floor": floor}


def _stamped_next_id(fs: LakeFS, keep: Manifest) -> int:
    """The highest ``next_id`` stamped by an append (`m2m.lake.integrity.STAMP_NEXT`) in a shard file of
    this lake in ``_data`` that ``keep`` does not reference, or 0. The appends of a version whose file
    is no longer readable (cut short: it states nothing) left such files, and their ids may have been
    handed out; a file of an append that never committed only makes the floor higher than needed.
    Local lakes (an object store's manifest is written whole); links are not followed."""
    import pyarrow as pa

    from m2m.lake.integrity import STAMP_LAKE, STAMP_NEXT
    from m2m.lake.manifest import DATA_DIR
    from m2m.lake.shard import open_regular
    from m2m.lake.vacuum import is_data_name

    if not fs.is_local:
        return 0
    referenced = {f.path for f in keep.files()}
    best = 0
    for name in fs.listdir(DATA_DIR):
        rel = f"{DATA_DIR}/{name}"
        path = fs.local_path(rel)
        if rel in referenced or not is_data_name(name) or name.startswith(".tmp-"):
            continue
        try:
            # a regular file, not through a link (a FIFO under a shard's name hung the repair, lock held)
            fd = open_regular(path, follow_links=False)
        except OSError:   # (CorruptShardError for a FIFO or folder: it states nothing)
            continue
        try:
            with os.fdopen(fd, "rb") as f:
                meta = pa.ipc.open_file(f).schema.metadata or {}
            value = int(meta.get(STAMP_NEXT.encode(), b"0"))
        except (OSError, ValueError, pa.ArrowException):
            continue   # not readable, or no stamp: states nothing
        if meta.get(STAMP_LAKE.encode(), b"").decode(errors="replace") != (keep.lake_id or ""):
            continue   # another lake's file (copied or planted) says nothing of this lake's ids
        if 0 < value < 1 << 63:
            best = max(best, value)
    return best


def _stated_next_id(fs: LakeFS, rel: str) -> int:
    """The ``next_id`` a version file states, read from its JSON alone (its segments may be what is
    broken), or 0 when it says none."""
    import json

    try:
        value = json.loads(fs.read_bytes(rel)).get("next_id", 0)
    except (ValueError, AttributeError, OSError):
        return 0
    # (a value beyond int64 is no next_id: the copy's manifest would be refused)
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 63
    return value if ok else 0
