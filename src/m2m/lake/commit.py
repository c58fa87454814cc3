"""Commits on object stores that many writer processes share: conditional puts, rebase, bounded retry.

A local lake serialises writers with its `flock` (`m2m.lake.lock`). An object store has no lock, so a
remote commit is optimistic: build version v+1 on the head v, then create the manifest of v+1 with a
conditional put (S3 ``If-None-Match: *``); if another writer created v+1 first, rebase on the new head
and try again (bounded in attempts and seconds, with backoff and jitter). No version is ever replaced,
so no commit is lost or silently overwritten.

Appends commute, except for their ids, which are stored in the shard files. To keep a rebase down to
rewriting the manifest, an append first *reserves* its id range: it creates ``_ids/<start>.json`` with a
conditional put, where ``start`` = max(head's ``next_id``, end of the newest reservation); two writers
racing for the same start cannot both create that object, so the loser re-reads and takes the next
range. The shards are written once with the reserved ids; every attempt then only inserts them, in id
order, into the head's shard list (ids stay ascending in position order; ids of a writer that died
after reserving stay unused, a gap, like the ids of merged rows). Each build also checks that no
shard of the head overlaps the reserved range; should one (a reservation lost to an untimely vacuum),
the shards are rewritten with a fresh reservation, so a duplicate id can never be published.

Other commits (estimate_kappa, consolidate) are rebuilt on the new head, at most
``HEAVY_ATTEMPTS`` times, then fail with `CommitConflictError`. Files a failed attempt wrote are
removed; those of a process that died are left to `Lake.vacuum` (remote: objects older than its
``min_age_s``).
"""

from __future__ import annotations

import bisect
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from m2m.errors import (
    CommitConflictError,
    CorruptShardError,
    InternalError,
    LakeNotFoundError,
    ObjectStoreError,
    SignatureError,
)
from m2m.lake import summary as lake_stats
from m2m.lake.manifest import (
    Manifest,
    ShardEntry,
    added_shards,
    list_versions,
    load_all,
    load_segments,
    manifest_name,
    missing_file,
    read_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

RESERVATIONS_DIR = "_ids"
COMMIT_ATTEMPTS = 64        # publish attempts of one append (each costs a manifest read and one PUT)
HEAVY_ATTEMPTS = 3          # rebuilds of estimate_kappa / consolidate on a moved head
COMMIT_SECONDS = 300.0      # bound on the whole retry loop of one commit
_WRITER = uuid.uuid4().hex  # names this process in its reservations (diagnostics only)


def _backoff(attempt: int) -> float:
    """Exponential backoff with full jitter: 25 ms doubling up to 1 s (spreads writers that collided)."""
    return random.uniform(0.0, min(0.025 * 2 ** attempt, 1.0))


def remove_unpublished(fs: Any, rels: Iterable[str], after: str = "a failed commit") -> None:
    """Remove the files a commit wrote but did not publish; a file that cannot go is left for a vacuum
    (the commit's own error matters more), and a store that stopped answering costs one wait, not one per file."""
    rels = list(rels)
    for i, rel in enumerate(rels):
        try:
            fs.remove(rel)
        except ObjectStoreError as exc:
            logger.warning("could not remove %s after %s (%s); %d more file(s) left for a vacuum",
                           rel, after, exc, len(rels) - i - 1)
            return
        except OSError as exc:
            logger.warning("could not remove %s after %s: %s", rel, after, exc)


def adopt_new_files(fs: Any, base: Manifest, new: Manifest) -> None:
    """Log the files ``new`` adds to ``base`` (written by other processes: Ray tasks) as this handle's
    writes (`LakeFS.note_written`), so that the commit treats them as it treats its own."""
    old = {f.path for f in base.files()}
    fs.note_written(f.path for s in added_shards(base, new) for f in s.files if f.path not in old)


@contextmanager
def removed_on_failure(fs: Any, what: str) -> Iterator[None]:
    """Remove what ``fs`` wrote inside the block if the block raises (a Ray task's files: its driver
    never learns their names, so a failed task left them in the store)."""
    mark = fs.mark()
    try:
        yield
    except BaseException:
        remove_unpublished(fs, fs.written_since(mark), what)
        raise


def outcome_unknown(exc: BaseException) -> bool:
    """Whether ``exc`` ended a remote commit whose version put was sent without an answer (a store that
    stopped answering): that version may exist, so the commit's files must stay."""
    return bool(getattr(exc, "_m2m_outcome_unknown", False))


def commit_remote(fs: Any, operation: str, build: Callable[[Manifest], Manifest],
                  attempts: int = COMMIT_ATTEMPTS, seconds: float = COMMIT_SECONDS) -> Manifest:
    """Publish ``build(head)`` as the next version, rebasing on a moved head (see the module doc)."""
    if not getattr(fs, "atomic_create", False) and not getattr(fs, "_warned_single_writer", False):
        fs._warned_single_writer = True
        logger.warning("%s has no conditional put here: commits are safe with ONE writer process only",
                       fs.url)
    t0 = time.monotonic()
    attempt = 0
    while True:
        base = read_manifest(fs)
        mark = fs.mark()
        published = False
        putting = False  # write_manifest has started
        unknown = False  # the version's put failed in the store's transport: it may have landed
        try:
            new = build(base)
            if new.version != base.version + 1:
                raise InternalError(f"commit {operation!r} built version {new.version} on {base.version}")
            fresh = _fresh_files(fs, base, new)
            try:
                putting = True
                new = write_manifest(fs, new, must_exist=fresh)
                published = True
            except CommitConflictError as exc:
                if getattr(exc, "final", False):  # this commit's own file is gone: no rebase helps
                    raise
        except BaseException as exc:
            # a store's definite refusal (AccessDenied, no credentials: `refused`) did not land
            unknown = putting and isinstance(exc, ObjectStoreError) and not getattr(exc, "refused", False)
            if unknown:  # callers keep their files too (`outcome_unknown`)
                exc._m2m_outcome_unknown = True  # type: ignore[attr-defined]
                logger.warning("%s on %s: the put of version %d failed without an answer; its files are kept in "
                               "case it landed (a vacuum removes them if no version references them)", operation,
                               fs.url, base.version + 1)
            raise
        finally:  # the files this attempt wrote, unless they are (or may now be) part of a version
            if not published and not unknown:
                remove_unpublished(fs, fs.written_since(mark))
        if published:
            if not getattr(fs, "atomic_create", False):
                _check_not_overwritten(fs, new)
            written = set(fs.written_since(mark))
            gone = missing_file(fs, fresh + [g.path for g in new.segments or () if g.path in written])
            if gone is not None:  # between write_manifest's check and its put
                raise CorruptShardError(f"version {new.version} of {fs.url} was published, but its file {gone} "
                                        "was removed meanwhile (by a vacuum with min_age_s=0?): reading that version "
                                        f"fails; `m2m repair {fs.url}` sets it aside")
            if _overtaken(fs, operation, base, new, fresh):
                # a vacuum removed this number's file after other writers had moved past it, and this put re-made
                # it: the lake's head holds none of this commit (observed: ids returned, rows in no version, the
                # next vacuum deleted them). Withdraw it and rebase, as on any other conflict.
                fs.remove(manifest_name(new.version))
                # this attempt's writes, as after a conflict (a successor holding none of its files holds none of its
                # segments); files written before the attempt (an append's shards) serve the rebase
                remove_unpublished(fs, fs.written_since(mark))
                logger.warning("%s on %s: version %d was re-made after a vacuum removed it (newer versions exist); "
                               "withdrawn and rebased", operation, fs.url, new.version)
            else:
                fs.published_mark = fs.mark()
                if attempt:
                    logger.info("%s committed as version %d after %d rebase(s)", operation, new.version, attempt)
                return new
        attempt += 1
        elapsed = time.monotonic() - t0
        if attempt >= attempts or elapsed >= seconds:
            raise CommitConflictError(
                f"{operation} on {fs.url}: other writers committed first {attempt} time(s) "
                f"in {elapsed:.1f} s; gave up (nothing of this commit was published)")
        time.sleep(_backoff(attempt))


def _overtaken(fs: Any, operation: str, base: Manifest, new: Manifest, fresh: list[str]) -> bool:
    """Whether the just-published ``new`` sits below a version that was not built on it: other writers
    committed ``new.version`` (and beyond) first and a vacuum removed that file before this put re-made it.

    The next version found is asked. An append is held by it when it holds any of the append's ids (this
    writer reserved them alone), compacted or not: a rebase would add them twice. Another commit is held
    when it holds any of its new files (a compaction built on it that rewrote them all is then taken as
    overtaking: the commit is redone on the new head, nothing is lost). A commit that adds no file of its
    own is not judged (nothing tells its successor's base apart)."""
    if not fresh:
        return False
    later = [v for v in list_versions(fs) if v > new.version]
    if not later:
        return False
    try:
        successor = read_manifest(fs, later[0])
        if operation.startswith("append"):
            return not any(_holds_ids(successor, s.id_min, s.id_max) for s in added_shards(base, new))
        held = {f.path for shard in successor.shards for f in shard.files}
    except (CorruptShardError, LakeNotFoundError, SignatureError):
        return False  # unreadable or gone again: not evidence against this commit
    return held.isdisjoint(fresh)


def _holds_ids(m: Manifest, lo: int, hi: int) -> bool:
    """Whether a shard of ``m`` holds ids in ``[lo, hi]`` (a segmented manifest reads only the segments
    whose id range meets it)."""
    if m.segments is not None:
        refs = [g for g in m.segments if g.id_max >= lo and g.id_min <= hi]
        load_segments(refs)
        shards: Any = (s for g in refs for s in g.entries)
    else:
        shards = m.shards
    return any(s.id_max >= lo and s.id_min <= hi for s in shards)


def _fresh_files(fs: Any, base: Manifest, new: Manifest) -> list[str]:
    """The files ``new`` adds to ``base`` that this handle wrote since its last published commit (the
    shard files, sidecars and merged shards of this operation): one existence check each, as many as
    the puts that wrote them."""
    mine = set(fs.written_since(getattr(fs, "published_mark", 0)))
    return [f.path for s in added_shards(base, new) for f in s.files if f.path in mine]


def _check_not_overwritten(fs: Any, new: Manifest) -> None:
    """On a store without conditional put, detect (after the fact) a writer that replaced our version."""
    from m2m.lake.manifest import published_bytes

    if fs.read_bytes(manifest_name(new.version)) != published_bytes(fs, new):
        raise CommitConflictError(
            f"version {new.version} of {fs.url} was overwritten by another writer: this store "
            f"has no conditional put, so only one writer process may commit at a time")


def reserve_ids(fs: Any, rows: int, attempts: int = COMMIT_ATTEMPTS, seconds: float = COMMIT_SECONDS) -> int:
    """Reserve ``rows`` ids for one append; returns the first (see the module doc)."""
    t0 = time.monotonic()
    for attempt in range(attempts):
        start = read_manifest(fs).next_id
        names = [n for n in fs.listdir(RESERVATIONS_DIR) if n.endswith(".json") and n[:-5].isdigit()]
        if names:
            last = max(names, key=lambda n: int(n[:-5]))
            try:
                start = max(start, int(json.loads(fs.read_bytes(f"{RESERVATIONS_DIR}/{last}"))["end"]))
            except FileNotFoundError:  # vacuumed between list and read: list again
                continue
        doc = json.dumps({"start": start, "end": start + rows, "writer": _WRITER, "created": time.time()}).encode()
        if fs.create_exclusive(f"{RESERVATIONS_DIR}/{start:020d}.json", doc):
            return start
        if time.monotonic() - t0 >= seconds:
            break
        time.sleep(_backoff(attempt))
    raise CommitConflictError(f"could not reserve {rows} ids on {fs.url}: other writers "
                              f"kept taking the next range")


class _IdsTaken(Exception):
    """The reserved id range overlaps a committed shard: write the shards again with a new range."""


def insert_shards(base: Manifest, shards: tuple[ShardEntry, ...], first: int, rows: int) -> tuple[ShardEntry, ...]:
    """``base``'s shards with ``shards`` (ids ``first``..``first+rows-1``) inserted in id order."""
    last = first + rows - 1
    load_all(base.shards)  # an object store: the segments not in memory are read overlapped
    if any(s.rows and s.id_min <= last and s.id_max >= first for s in base.shards):
        raise _IdsTaken
    at = bisect.bisect_left([s.id_min for s in base.shards], first)
    return base.shards[:at] + shards + base.shards[at:]


def _last_id_before(m: Manifest, first: int) -> int:
    """The largest id of ``m`` below ``first`` (-1: none)."""
    load_all(m.shards)
    at = bisect.bisect_left([s.id_min for s in m.shards], first)
    return m.shards[at - 1].id_max if at else -1


def append_remote(fs: Any, write: Callable[[int, int | None], list[ShardEntry]], rebase: Callable[[Manifest], Any],
                  rows: int, summary: dict[str, Any]) -> tuple[Manifest, np.ndarray]:
    """One append to a shared remote lake: reserve ids, write the shards once, publish with rebase.

    ``write(first_id, prev_id)`` writes the shards (``prev_id``: the first shard's ``m2m.prev_id``
    stamp, None for none); ``rebase(base)`` returns the schema (`SchemaUpdate`) of the
    append on ``base`` (raising when a concurrent writer changed it incompatibly).
    """
    for _ in range(3):
        first = reserve_ids(fs, rows)
        # the first shard's m2m.prev_id stamp: the head's last id before the reservation when it ends
        # right before it (no other reservation lies between, so no other append can ever land
        # between them); after a gap (another writer's reservation in flight, or abandoned) the
        # predecessor is unknown until commit and the stamp is left out
        before = _last_id_before(read_manifest(fs), first)
        prev = before if before == first - 1 else None
        mark = fs.mark()
        try:
            shards = tuple(write(first, prev))

            def build(base: Manifest, shards: tuple[ShardEntry, ...] = shards, first: int = first,
                      prev: int | None = prev) -> Manifest:
                if prev is not None and _last_id_before(base, first) != prev:
                    raise _IdsTaken  # the shard before moved (a rollback): its stamp would be wrong
                schema = rebase(base)
                return base.next(shards=insert_shards(base, shards, first, rows),
                                 next_id=max(base.next_id, first + rows), label_type=schema.label_type,
                                 label_vocabulary=schema.label_vocabulary, metadata=schema.metadata,
                                 stats=lake_stats.merge(base.stats, summary),
                                 operation={"type": "append", "rows": rows})

            new = commit_remote(fs, "append", build)
        except _IdsTaken:
            logger.warning("ids %d.. reserved on %s were taken (or the shard before them changed); writing "
                           "the append again", first,
                           fs.url)
            remove_unpublished(fs, fs.written_since(mark))
            continue
        except BaseException as exc:
            if not outcome_unknown(exc):
                remove_unpublished(fs, fs.written_since(mark))
            raise
        return new, np.arange(first, first + rows, dtype=np.int64)
    raise CommitConflictError(f"append to {fs.url}: reserved ids were taken 3 times")


#: Below this ``min_age_s`` a remote vacuum checks, after deleting, that no version published meanwhile
#: names what it deleted (a commit takes seconds; objects this old belong to no running commit)
MIN_SAFE_AGE_S = 600.0


def _check_no_version_lost(fs: Any, seen: int, removed: list[str],
                           add_files: Callable[[int, set[str], set[str]], None]) -> None:
    """`CorruptShardError` when a version above ``seen``, published while the vacuum deleted, names one of
    the objects it ``removed`` (the milliseconds between its last listing and its deletes)."""
    from m2m.lake.manifest import list_versions

    gone = {rel.rsplit("/", 1)[-1]: rel for rel in removed}
    for v in [v for v in list_versions(fs) if v > seen]:
        files: set[str] = set()
        add_files(v, files, files)
        hit = sorted(files & set(gone))
        if hit:
            raise CorruptShardError(f"vacuum removed {gone[hit[0]]} while version {v} of {fs.url}, published at "
                                    f"that moment, names it: roll the lake back to version {seen} (m2m rollback "
                                    f"--to {seen}; the rows committed since are lost) and vacuum with a larger "
                                    "min_age_s")


def vacuum_remote(fs: Any, keep: int, min_age_s: float) -> dict[str, int]:
    """`Lake.vacuum` on an object store: no lock exists, so objects a running commit may still be
    about to reference (younger than ``min_age_s``) are kept, and so is the newest id reservation."""
    from m2m.lake.manifest import DATA_DIR, MANIFEST_DIR, SEGMENT_DIR, list_versions, manifest_name
    from m2m.lake.vacuum import is_data_name, is_manifest_temp, is_segment_name

    now = time.time()

    def old(mtime: float | None) -> bool:
        return min_age_s <= 0 or (mtime is not None and now - mtime >= min_age_s)

    versions = list_versions(fs)
    kept = versions[-keep:]
    live: set[str] = set()
    live_segments: set[str] = set()

    def add_files(v: int, files: set[str], segments: set[str]) -> None:
        m = read_manifest(fs, v)
        files.update(f.path.rsplit("/", 1)[-1] for f in m.files())
        if m.format_version >= 3:
            segments.update(g.path.rsplit("/", 1)[-1] for g in m.segments or ())

    for v in kept:
        add_files(v, live, live_segments)
    removed_versions = 0
    for v in versions[:-keep]:
        fs.remove(manifest_name(v))
        removed_versions += 1
    for name, mtime in fs.list_detail(MANIFEST_DIR):
        if is_manifest_temp(name) and old(mtime):
            fs.remove(f"{MANIFEST_DIR}/{name}")
    doomed = [f"{DATA_DIR}/{name}" for name, mtime in fs.list_detail(DATA_DIR)
              if is_data_name(name) and name not in live and old(mtime)]
    doomed += [f"{SEGMENT_DIR}/{name}" for name, mtime in fs.list_detail(SEGMENT_DIR)  # a commit writes these first
               if (is_segment_name(name) and name not in live_segments or is_manifest_temp(name)) and old(mtime)]
    # versions published since the listing above (listing a large store takes a while) may reference
    # young objects a small min_age_s let through: theirs are live too (until 2026-12-07 a vacuum with
    # min_age_s=0 deleted a compaction's merged file published meanwhile: an unreadable head, no error)
    seen = versions[-1] if versions else -1
    newer = [v for v in list_versions(fs) if v > seen]
    for v in newer:
        add_files(v, live, live_segments)
    keep_names = live | live_segments
    doomed = [rel for rel in doomed if rel.rsplit("/", 1)[-1] not in keep_names]
    for rel in doomed:
        fs.remove(rel)
    removed_files = len(doomed)
    if doomed and min_age_s < MIN_SAFE_AGE_S:
        _check_no_version_lost(fs, max([seen, *newer]), doomed, add_files)
    reservations = sorted((n for n in fs.list_detail(RESERVATIONS_DIR) if n[0][:-5].isdigit()),
                          key=lambda n: int(n[0][:-5]))
    for name, mtime in reservations[:-1]:
        if old(mtime):
            fs.remove(f"{RESERVATIONS_DIR}/{name}")
    return {"versions_removed": removed_versions, "files_removed": removed_files}
