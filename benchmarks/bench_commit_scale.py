"""The append/open cost curve of a lake fed by small appends, before and after `Lake.compact`.

    PYTHONPATH=src python benchmarks/bench_commit_scale.py [--shards 100,1000,10000] [--dim 32]
        [--rows 100] [--appends 20] [--opens 5] [--json OUT]

For each shard count N, a local lake of N shards of ``--rows`` rows is built in one commit (each shard
exactly what a ``--rows``-row append writes: one shard file, its manifest entry with block checksums),
then timed: ``--appends`` appends of ``--rows`` rows (median ms; each adds one shard), `open_lake`
(median of ``--opens``; it reads the newest manifest and cross-checks every file's Arrow footer) and
the manifest's size; then `Lake.compact()` (default target 128 MiB) and the same timings after it (``--no-compact``: not).
The build is not timed as appends (N appends at growing cost would take hours at 10k shards).
A lake of more than `m2m.lake.manifest.SEGMENT_SHARDS` shards is written as format 3 (a version
file over segment files); each row reports the format, the segment count and the last segment's
size (an append rewrites at most that segment and the version file). ``--linked-above N``: lakes of
more than N shards are built with hard links of one shard file (`build_linked`: a 100k-file build
takes ~15 min otherwise); format-3 opens and appends touch no existing shard file, so the timings
stand, but such a lake cannot be read or verified.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def median_ms(fn: Callable[[], Any], repeat: int, cpu: list[float] | None = None) -> float:
    """Median wall ms of ``repeat`` calls; with ``cpu``, appends the median CPU ms of this process
    (less sensitive to other processes on a shared machine; excludes waiting for fsync)."""
    out = []
    used = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        out.append(time.perf_counter() - t0)
        used.append(time.process_time() - c0)
    if cpu is not None:
        cpu.append(round(statistics.median(used) * 1e3, 2))
    return round(statistics.median(out) * 1e3, 2)


def build(path: Path, shards: int, rows: int, dim: int, fsync: bool = True) -> float:
    """A lake of ``shards`` shards of ``rows`` rows, written as one commit; returns seconds.
    ``fsync=False``: the build's files are not fsynced (setup only: the build is not what is timed)."""
    from m2m import M2MConfig, create_m2m
    from m2m._validate import validate_splats
    from m2m.lake import summary as lake_stats
    from m2m.lake.writer import _ROW_OVERHEAD, SchemaUpdate, shard_rows, write_splats

    per_shard_bytes = rows * (dim * 4 + _ROW_OVERHEAD)   # the writer's own per-row budget
    assert shard_rows(dim, "float32", per_shard_bytes) == rows
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with create_m2m(M2MConfig(path=str(path), latent_dim=dim)) as lake:
        chunk = 1000 * rows
        total = shards * rows

        def batches():  # type: ignore[no-untyped-def]
            for lo in range(0, total, chunk):
                n = min(chunk, total - lo)
                yield validate_splats(rng.standard_normal((n, dim), dtype=np.float32), None, None, None, None, dim)

        def make(base):  # type: ignore[no-untyped-def]
            entries = write_splats(lake._fs, batches(), base.next_id, dim, "float32", per_shard_bytes,
                                   SchemaUpdate.of(base))
            # the stats an append would record (the build writes no kappa; every alpha is 1)
            stats = lake_stats.merge(base.stats, lake_stats.summarize(np.full(total, np.nan, np.float32),
                                                                      np.ones(total, np.float32)))
            return base.next(shards=tuple(entries), next_id=base.next_id + total, stats=stats,
                             operation={"type": "append"})

        real_fsync = os.fsync
        if not fsync:
            os.fsync = lambda fd: None  # type: ignore[assignment]
        try:
            lake.commit("append", make)
        finally:
            os.fsync = real_fsync
        assert len(lake.manifest.shards) == shards
    return time.perf_counter() - t0


def build_linked(path: Path, shards: int, rows: int, dim: int) -> float:
    """A lake of ``shards`` shards of ``rows`` rows whose files are hard links of ONE real shard file
    (manifest entries with the right id ranges, sizes and checksums; the files' ids are those of shard
    0, so reading shard k > 0 is refused by the footer check). For timing commits and opens of a
    segmented manifest (format 3), which touch no existing shard file; returns seconds."""
    import uuid
    from dataclasses import replace

    from m2m import M2MConfig, create_m2m
    from m2m.lake.manifest import DATA_DIR

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with create_m2m(M2MConfig(path=str(path), latent_dim=dim)) as lake:
        lake.add_splats(rng.standard_normal((rows, dim), dtype=np.float32))
        first = lake.manifest.shards[0]
        src = lake._fs.local_path(first.files[0].path)
        entries = [first]
        for k in range(1, shards):
            name = f"{DATA_DIR}/{uuid.uuid4().hex}.arrow"
            try:
                os.link(src, lake._fs.local_path(name))
            except OSError as exc:  # EMLINK: a file system's limit on links to one inode (ext4: 65,000)
                if exc.errno != errno.EMLINK:
                    raise
                shutil.copyfile(src, lake._fs.local_path(name))
                src = lake._fs.local_path(name)
            entries.append(replace(first, id_min=k * rows, id_max=k * rows + rows - 1,
                                   files=(replace(first.files[0], path=name),)))
        real_fsync = os.fsync
        os.fsync = lambda fd: None  # type: ignore[assignment]  # setup only, as --no-fsync-build
        try:
            lake.commit("append", lambda base: base.next(shards=tuple(entries), next_id=shards * rows,
                                                         operation={"type": "append"}))
        finally:
            os.fsync = real_fsync
        assert len(lake.manifest.shards) == shards
    return time.perf_counter() - t0


def measure(path: Path, rows: int, dim: int, appends: int, opens: int) -> dict[str, Any]:
    from m2m import open_lake
    from m2m.lake.manifest import list_versions, manifest_name

    rng = np.random.default_rng(1)
    with open_lake(str(path)) as lake:
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        cpu: list[float] = []
        append_ms = median_ms(lambda: lake.add_splats(x), appends, cpu)
        shards = len(lake.manifest.shards)
        m = lake.manifest
        segments = None if m.segments is None else len(m.segments)
        last_segment = None if not m.segments else m.segments[-1].bytes
    open_ms = median_ms(lambda: open_lake(str(path)).close(), opens, cpu)
    head = list_versions(_fs(path))[-1]
    # what one append writes to the manifest: the version file, plus (format 3) its last segment
    return {"shards": shards, "append_ms": append_ms, "open_ms": open_ms, "append_cpu_ms": cpu[0],
            "open_cpu_ms": cpu[1], "format_version": m.format_version,
            "segments": segments, "manifest_bytes": os.path.getsize(path / manifest_name(head)),
            "last_segment_bytes": last_segment}


def _fs(path: Path) -> Any:
    from m2m.lake.fs import LocalFS

    return LocalFS(str(path))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="100,1000,10000")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--appends", type=int, default=20)
    ap.add_argument("--opens", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-fsync-build", action="store_true",
                    help="build the lakes without fsync (halves the build at 100k shards; timings unaffected)")
    ap.add_argument("--dir", default=None, help="where the lakes are built (default: a temporary directory)")
    ap.add_argument("--linked-above", type=int, default=None,
                    help="build lakes of more shards than this with hard-linked files (`build_linked`)")
    ap.add_argument("--no-compact", action="store_true", help="time the lake as built only")
    a = ap.parse_args()

    from m2m import open_lake

    root = Path(a.dir or tempfile.mkdtemp(prefix="m2m-bench-commit-"))
    results = []
    try:
        for n in [int(s) for s in a.shards.split(",")]:
            path = root / f"lake-{n}"
            linked = a.linked_above is not None and n > a.linked_above
            build_s = (build_linked(path, n, a.rows, a.dim) if linked
                       else build(path, n, a.rows, a.dim, fsync=not a.no_fsync_build))
            before = measure(path, a.rows, a.dim, a.appends, a.opens)
            before["linked_files"] = linked
            seg = (f"format {before['format_version']}, {before['segments'] or 0} segments, last "
                   f"{(before['last_segment_bytes'] or 0) / 1e3:.1f} kB")
            if a.no_compact:
                results.append({"shards": n, "rows_per_shard": a.rows, "build_s": round(build_s, 2), "before": before})
                print(f"{n:>7,} shards: append {before['append_ms']:8.1f} ms (cpu {before['append_cpu_ms']:6.1f})  "
                      f"open {before['open_ms']:8.1f} ms (cpu {before['open_cpu_ms']:7.1f})  "
                      f"version file {before['manifest_bytes'] / 1e3:7.1f} kB ({seg})  "
                      f"(build {build_s:.0f} s{', linked files' if linked else ''})", flush=True)
                shutil.rmtree(path, ignore_errors=True)
                continue
            with open_lake(str(path)) as lake:
                t0 = time.perf_counter()
                report = lake.compact()
                compact_s = time.perf_counter() - t0
                assert lake.verify() == [] if n <= 1000 else True
            after = measure(path, a.rows, a.dim, a.appends, a.opens)
            row = {"shards": n, "rows_per_shard": a.rows, "build_s": round(build_s, 2), "before": before,
                   "compact": {"seconds": round(compact_s, 2), "shards_before": report.shards_before,
                               "shards_after": report.shards_after, "bytes_written": report.bytes_written},
                   "after": after}
            results.append(row)
            print(f"{n:>7,} shards: append {before['append_ms']:8.1f} ms  open {before['open_ms']:8.1f} ms  "
                  f"manifest {before['manifest_bytes'] / 1e6:7.2f} MB | compact {compact_s:6.1f} s -> "
                  f"{after['shards']} shards: append {after['append_ms']:6.1f} ms  open {after['open_ms']:6.1f} ms  "
                  f"manifest {after['manifest_bytes'] / 1e3:6.1f} kB  (build {build_s:.0f} s)", flush=True)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if a.json:
        doc = {"benchmark": "commit-scale", "date": time.strftime("%Y-%m-%d"), "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
            "dim": a.dim, "dtype": "float32", "build_fsync": not a.no_fsync_build, "appends_timed": a.appends, "opens_timed": a.opens,
            "results": results}
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
