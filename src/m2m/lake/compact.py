"""Compaction: rewrite runs of small shards (and their sidecars) into shards of a target size.

A lake fed by many small appends holds one shard per append, and every commit rewrites a manifest
listing all of them; compaction merges runs of consecutive small shards into one shard each, in one
atomic commit. Ids, row order and every stored value are kept: the merged shard's files are the
concatenation of the run's files, slot by slot (main file, then each sidecar), written by the
shard writer (`m2m.lake.shard.write_shard_file`), so a geometry sidecar stays bound to its rows.

The heavy part (reading, checking and writing the merged files) runs on a snapshot of the head
without any lock; publishing is a cheap rebase on whatever head exists then:

- a run is replaced only if its shards are still in the head, unchanged and contiguous; a run that
  a concurrent commit touched (new sidecars, a consolidation, an append that landed inside its id
  range) is dropped and its new files removed, so nothing another writer committed is ever lost;
- local lakes publish under the write lock (waiting up to ``LOCK_WAIT_S`` for an appender to
  finish); object stores publish with the conditional put of `m2m.lake.commit.commit_remote` and
  rebase on a moved head;
- when every run was dropped, the compaction starts again from the new head (at most ``attempts``
  times), then reports that nothing was committed.

Old shard files are never removed here: a reader pinned to an older version keeps streaming
through it, until `Lake.vacuum` removes versions past retention. A run is only formed from shards
with the same file layout (same columns per file), and on an object store it never spans an id
range reserved by an append that has not committed yet (that append would have to be rewritten).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from m2m.errors import CommitConflictError, ConfigError
from m2m.lake.commit import outcome_unknown, remove_unpublished
from m2m.lake.fs import LakeFS
from m2m.lake.integrity import check_batch, merged_stamp
from m2m.lake.manifest import Manifest, ShardEntry, added_shards, missing_file, read_manifest, write_manifest
from m2m.lake.shard import open_shard_file, sync_files, write_shard_file

logger = logging.getLogger(__name__)

SMALL_FRACTION = 0.5   # a shard below this fraction of the target is "small": a compaction candidate
LOCK_WAIT_S = 300.0    # local publish: how long to wait for the write lock held by another writer
ATTEMPTS = 3           # plans, when every run of a plan was invalidated by concurrent commits

Progress = Callable[[int], None]
Publish = Callable[[Callable[[Manifest], Manifest]], Manifest]


@dataclass(frozen=True)
class CompactionReport:
    """What `Lake.compact` did. ``version`` is the committed version (None: nothing to do, or every
    planned run lost to concurrent commits); ``runs_dropped``: runs a concurrent commit invalidated."""

    shards_before: int
    shards_after: int
    shards_merged: int      # input shards replaced
    shards_written: int     # merged shards committed
    rows_rewritten: int
    bytes_written: int
    runs_dropped: int
    version: int | None
    seconds: float


def shard_bytes(s: ShardEntry) -> int:
    return sum(f.bytes for f in s.files)


def layout(s: ShardEntry) -> tuple[tuple[str, ...], ...]:
    """The columns of each file of a shard: only shards of one layout are merged."""
    return tuple(f.columns for f in s.files)


def pending_reservations(fs: LakeFS, base: Manifest) -> list[int]:
    """First ids of appends on an object store that reserved ids below ``base.next_id`` but are not
    in ``base`` (in flight, or of a writer that died): runs never span them."""
    if fs.is_local:
        return []
    from m2m.lake.commit import RESERVATIONS_DIR

    try:
        names = fs.listdir(RESERVATIONS_DIR)
    except FileNotFoundError:
        return []
    starts = {s.id_min for s in base.shards}
    out = []
    for name in names:
        stem = name[:-5] if name.endswith(".json") else ""
        if stem.isdigit() and int(stem) < base.next_id and int(stem) not in starts:
            out.append(int(stem))
    return sorted(out)


def plan_runs(m: Manifest, target_bytes: int, barriers: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Runs ``[lo, hi)`` of shard indices of ``m`` to merge: >= 2 consecutive small shards of one
    layout, at most ``target_bytes`` together, not spanning an id in ``barriers``. Pure."""
    small = SMALL_FRACTION * target_bytes
    bar = np.asarray(sorted(barriers), dtype=np.int64)
    runs: list[tuple[int, int]] = []
    lo, total = 0, 0
    overheads: dict[tuple[tuple[str, ...], ...], int] = {}

    def overhead(s: ShardEntry) -> int:
        got = overheads.get(layout(s))
        if got is None:
            got = overheads[layout(s)] = file_overhead(m, s)
        return got

    def close(hi: int) -> None:
        if hi - lo >= 2:
            runs.append((lo, hi))

    for i, s in enumerate(m.shards):
        size = shard_bytes(s)
        if i > lo:
            prev = m.shards[i - 1]
            # the merged shard holds each file's overhead once: summing whole files planned merges of many
            # tiny shards far below the target, still "small", so compacting again merged them again
            fixed = overhead(s) if layout(s) == layout(prev) else 0
            added = size - fixed if fixed < size else size  # (a real file is never smaller than its overhead)
            split = (size >= small or total + added > target_bytes or layout(s) != layout(prev)
                     or bool(len(bar) and np.any((bar > prev.id_max) & (bar <= s.id_min))))
            if not split:
                total += added
                continue
            close(i)
        lo, total = i, size
        if size >= small:  # a big shard stands alone
            lo, total = i + 1, 0
    close(len(m.shards))
    return runs


def file_overhead(m: Manifest, s: ShardEntry) -> int:
    """Bytes of a shard's files that do not grow with its rows: an empty Arrow IPC file of each file's
    schema (a lower bound: the writer also pads each buffer), 0 when a type is not known. Pure."""
    import io

    from m2m.lake.integrity import expected_type

    total = 0
    for f in s.files:
        try:
            schema = pa.schema([pa.field(c, expected_type(m, c)) for c in f.columns])
        except (KeyError, ValueError, TypeError, pa.ArrowException):
            return 0
        sink = io.BytesIO()
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema))
        total += len(sink.getvalue())
    return total


def mergeable_shards(m: Manifest, target_bytes: int) -> int:
    """How many shards a compaction of ``m`` at ``target_bytes`` would replace (manifest only)."""
    return sum(hi - lo for lo, hi in plan_runs(m, target_bytes))


def merge_run(fs: LakeFS, m: Manifest, lo: int, hi: int, verify: bool = True) -> ShardEntry:
    """Write the shards ``m.shards[lo:hi]`` as one shard: each file slot's columns concatenated.

    Every input file is checked first (its CRC when ``verify``, its footer and ascending ids against
    the manifest), so a damaged file is never copied under fresh checksums.
    """
    shards = m.shards[lo:hi]
    entries = []
    for slot in range(len(shards[0].files)):
        parts: dict[str, list[pa.Array]] = {c: [] for c in shards[0].files[slot].columns}
        batches = []
        for i, s in enumerate(shards, start=lo):
            f = s.files[slot]
            batch = open_shard_file(fs, f, verify=verify)
            check_batch(m, i, f, batch, f.path, full=True)
            for c in parts:
                parts[c].append(batch.column(c))
            batches.append(batch.slice(0, 0))   # (its schema's stamps only)
        merged = {c: pa.concat_arrays(arrays) for c, arrays in parts.items()}
        entries.append(write_shard_file(fs, merged, stamp=merged_stamp(m, batches)))
    rows = sum(s.rows for s in shards)
    return ShardEntry(rows=rows, id_min=shards[0].id_min, id_max=shards[-1].id_max, files=tuple(entries))


def rebase(head: Manifest, base: Manifest, merged: Sequence[tuple[int, int, ShardEntry]]
           ) -> tuple[tuple[ShardEntry, ...], list[int]]:
    """``head``'s shards with each run of ``base`` that is still in ``head`` (same entries, contiguous)
    replaced by its merged shard; and the indices (into ``merged``) of the runs applied."""
    where = {s.files[0].path: i for i, s in enumerate(head.shards)}
    replace: dict[int, tuple[int, ShardEntry]] = {}
    applied = []
    for k, (lo, hi, new) in enumerate(merged):
        old = base.shards[lo:hi]
        at = where.get(old[0].files[0].path)
        if at is not None and head.shards[at:at + len(old)] == old:
            replace[at] = (len(old), new)
            applied.append(k)
    out: list[ShardEntry] = []
    i = 0
    while i < len(head.shards):
        if i in replace:
            n, new = replace[i]
            out.append(new)
            i += n
        else:
            out.append(head.shards[i])
            i += 1
    return tuple(out), applied


class _NothingLeft(Exception):
    """Every run of a plan was invalidated by concurrent commits: plan again on the new head."""


def compact(fs: LakeFS, publish: Publish, target_bytes: int, verify: bool = True,
            progress: Progress | None = None, attempts: int = ATTEMPTS,
            after_write: Callable[[], None] | None = None) -> CompactionReport:
    """Plan on the head, write the merged shards, publish with ``publish(build)`` (see the module doc).

    ``publish`` runs ``build(head) -> next manifest`` as one commit of the lake and returns what it
    committed. ``after_write`` (tests) runs between writing the files and publishing them.
    """
    if not isinstance(target_bytes, int) or isinstance(target_bytes, bool) or target_bytes < 1 << 16:
        raise ConfigError(f"target_bytes must be an int >= 65536 (bytes), got {target_bytes!r}")
    t0 = time.perf_counter()
    dropped_total = 0
    before = 0
    for _ in range(max(1, attempts)):
        base = read_manifest(fs)
        before = len(base.shards)
        runs = plan_runs(base, target_bytes, pending_reservations(fs, base))
        if not runs:
            return CompactionReport(before, before, 0, 0, 0, 0, dropped_total, None, time.perf_counter() - t0)
        written: list[str] = []
        merged: list[tuple[int, int, ShardEntry]] = []
        holder: dict[str, Any] = {}
        try:
            for lo, hi in runs:
                entry = merge_run(fs, base, lo, hi, verify)
                written += [f.path for f in entry.files]
                merged.append((lo, hi, entry))
                if progress is not None:
                    progress(entry.rows)
            if after_write is not None:
                after_write()

            def build(head: Manifest) -> Manifest:
                shards, applied = rebase(head, base, merged)
                if not applied:
                    raise _NothingLeft
                # a vacuum with min_age_s=0 may have taken files no version lists yet (locally: it waits for
                # the lock this build holds; an object store checks them at its version put, write_manifest)
                gone = missing_file(fs, [f.path for k in applied for f in merged[k][2].files]) if fs.is_local else None
                if gone is not None:
                    raise CommitConflictError(f"compaction of {fs.url}: its new file {gone} was removed (by a "
                                              "vacuum?) before the commit")
                holder["applied"] = applied
                holder["before"] = len(head.shards)   # (the head it commits onto: appends may have come since)
                return head.next(shards=shards, operation={
                    "type": "compact", "target_bytes": target_bytes, "shards_merged":
                        sum(merged[k][1] - merged[k][0] for k in applied), "shards_written": len(applied)})

            new = publish(build)
        except _NothingLeft:
            remove_unpublished(fs, written, "compaction")
            dropped_total += len(runs)
            logger.info("compaction: every run was changed by concurrent commits; planning again")
            continue
        except BaseException as exc:
            if not outcome_unknown(exc):  # a version put that may have landed keeps its files
                remove_unpublished(fs, written, "compaction")
            raise
        applied = holder["applied"]
        lost = [k for k in range(len(merged)) if k not in set(applied)]
        remove_unpublished(fs, [f.path for k in lost for f in merged[k][2].files], "compaction")
        dropped_total += len(lost)
        done = [merged[k] for k in applied]
        return CompactionReport(
            shards_before=holder["before"], shards_after=len(new.shards),
            shards_merged=sum(hi - lo for lo, hi, _ in done),
            shards_written=len(done), rows_rewritten=sum(e.rows for _, _, e in done),
            bytes_written=sum(f.bytes for _, _, e in done for f in e.files), runs_dropped=dropped_total,
            version=new.version, seconds=time.perf_counter() - t0)
    return CompactionReport(before, before, 0, 0, 0, 0, dropped_total, None, time.perf_counter() - t0)


def publish_local(fs: LakeFS, build: Callable[[Manifest], Manifest], lock_wait_s: float = LOCK_WAIT_S) -> Manifest:
    """One commit on a local lake under its write lock, waiting up to ``lock_wait_s`` for it (the
    merged files were written before, outside the lock; ``build`` only rebases)."""
    from m2m.lake.lock import WriteLock, lock_timeout

    wait = max(lock_wait_s, lock_timeout())
    with WriteLock(os.path.join(fs.root, "_lock"), timeout=wait):
        head = read_manifest(fs)
        new = build(head)
        sync_files(fs, [f.path for s in added_shards(head, new) for f in s.files])
        new = write_manifest(fs, new)
    return new


def publish_remote(fs: LakeFS, build: Callable[[Manifest], Manifest]) -> Manifest:
    """One commit on an object store: conditional put, rebased on a moved head (cheap: no files)."""
    from m2m.lake.commit import COMMIT_ATTEMPTS, commit_remote

    return commit_remote(fs, "compact", build, attempts=COMMIT_ATTEMPTS)

