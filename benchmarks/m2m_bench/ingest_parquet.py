"""Parquet ingest benchmark: `m2m ingest` of one Parquet file vs what a user would write instead
(`pq.read_table` + `np.save` + fsync of the same vectors), time and peak RSS, each in a fresh subprocess.

The file is written once with `pyarrow.parquet.write_table` defaults (a 100k-row file is one row group),
a float32 ``embedding`` fixed_size_list column plus an int label and a string column. Each measurement
runs in its own Python process that reports its wall time (around the work only, not interpreter start)
and its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The two measurements
alternate ``reps`` times; the best time and the highest peak RSS of each are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_RSS_MB = 600
GOAL_VS_BASELINE = 0.5

_MAKE = """
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
rows, dim, path, groups = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
g = np.random.default_rng(0)
per = -(-rows // groups)
writer = None
for lo in range(0, rows, per):  # one row group at a time: a 4 GB file is never in RAM here either
    n = min(per, rows - lo)
    x = g.standard_normal((n, dim), dtype=np.float32)
    t = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
                  "label": pa.array(np.arange(lo, lo + n) % 10), "id": pa.array(np.arange(lo, lo + n)),
                  "source": pa.array([f"doc{i}" for i in range(lo, lo + n)])})
    writer = writer or pq.ParquetWriter(path, t.schema)
    writer.write_table(t, row_group_size=n)
writer.close()
"""

_BASELINE = """
import json, os, resource, sys, time
import numpy as np, pyarrow.parquet as pq
src, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
table = pq.read_table(src, columns=["embedding", "label"])
col = table.column("embedding").combine_chunks()
x = col.flatten().to_numpy().reshape(-1, col.type.list_size)
np.save(out, x)
np.save(out + ".labels.npy", table.column("label").to_numpy())
for f in (out, out + ".labels.npy"):
    fd = os.open(f, os.O_RDONLY); os.fsync(fd); os.close(fd)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

_OURS = """
import json, resource, sys, threading, time
import pyarrow as pa
from m2m.cli.main import cli
src, lake, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
peak = {"arrow": 0}
done = threading.Event()
def watch():  # Arrow's own allocations (decoded Parquet pages and batches), sampled every 20 ms
    while not done.wait(0.02):
        peak["arrow"] = max(peak["arrow"], pa.total_allocated_bytes())
threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
try:
    cli(["ingest", src, "--lake", lake, "--label-column", "label", "-q", *extra], prog_name="m2m",
        standalone_mode=False)
except SystemExit as exc:
    if exc.code:
        raise
seconds = time.perf_counter() - t0
done.set()
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_arrow": peak["arrow"], "pool": pa.default_memory_pool().backend_name}))
"""

_IDLE = """
import json, resource
import pyarrow, m2m.cli.main, m2m.lake.lake, m2m.lake.ingest  # noqa: F401  (what the ingest imports)
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _child(code: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def run(quick: bool = False, rows: int | None = None, dim: int = 2560, reps: int = 1, row_groups: int = 1,
        baseline: bool = True, ingest_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Time and peak RSS of `m2m ingest FILE.parquet` vs read_table + np.save + fsync (see module doc).

    ``row_groups``: row groups of the file; ``baseline``: False measures m2m only (a 4 GB file's
    read_table needs > 4 GB of RAM); ``ingest_args``: more `m2m ingest` options (e.g. --shard-size).
    """
    n = rows or (20_000 if quick else 100_000)
    tmp = Path(tempfile.mkdtemp(prefix="m2m-bench-ingest-parquet-"))
    src = tmp / "embeddings.parquet"
    try:
        _child(_MAKE, str(n), str(dim), str(src), str(row_groups))
        res: dict[str, Any] = {"rows": n, "dim": dim, "file_bytes": src.stat().st_size, "row_groups": row_groups,
                               "vector_bytes": n * dim * 4, "reps": reps, "ingest_args": list(ingest_args),
                               "idle_peak_rss": _child(_IDLE)["peak_rss"]}
        base: list[dict[str, Any]] = []
        ours: list[dict[str, Any]] = []
        for rep in range(reps):
            if baseline:
                base.append(_child(_BASELINE, str(src), str(tmp / f"base{rep}.npy")))
                for f in tmp.glob(f"base{rep}.npy*"):
                    f.unlink()
            ours.append(_child(_OURS, str(src), str(tmp / f"lake{rep}"), *ingest_args))
            shutil.rmtree(tmp / f"lake{rep}")
        res["ours_seconds"] = min(r["seconds"] for r in ours)
        res["ours_peak_rss"] = max(r["peak_rss"] for r in ours)
        res["ours_peak_arrow"] = max(r["peak_arrow"] for r in ours)
        res["all_runs"] = {"baseline": base, "ours": ours}
        if baseline:
            res["baseline_seconds"] = min(r["seconds"] for r in base)
            res["baseline_peak_rss"] = max(r["peak_rss"] for r in base)
            res["ratio_speed"] = res["baseline_seconds"] / res["ours_seconds"]   # >= 0.5 is the goal
        res["goal_rss_mb"] = GOAL_RSS_MB
        res["goal_vs_baseline"] = GOAL_VS_BASELINE
        res["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        res["load_average"] = os.getloadavg()
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def format_table(res: dict[str, Any]) -> str:
    mb = 1 << 20
    extra = f" {' '.join(res.get('ingest_args', []))}" if res.get("ingest_args") else ""
    lines = [f"ingest of one Parquet file: {res['rows']:,} x {res['dim']} float32 + label, id, source "
             f"({res['file_bytes'] / 1e9:.2f} GB file, {res.get('row_groups', 1)} row groups), each in a fresh "
             f"process, best/peak of {res['reps']}",
             f"{'measure':<46}{'seconds':>10}{'rows/s':>12}{'peak RSS MiB':>14}",
             f"{'m2m ingest' + extra + ' (ours, durable commit)':<46}{res['ours_seconds']:>10.1f}"
             f"{res['rows'] / res['ours_seconds']:>12,.0f}{res['ours_peak_rss'] / mb:>14,.0f}"]
    if "baseline_seconds" in res:
        lines.append(f"{'pq.read_table + np.save + fsync (baseline)':<46}{res['baseline_seconds']:>10.1f}"
                     f"{res['rows'] / res['baseline_seconds']:>12,.0f}{res['baseline_peak_rss'] / mb:>14,.0f}")
    if "idle_peak_rss" in res:
        lines.append(f"of our peak: {res['idle_peak_rss'] / mb:,.0f} MiB the interpreter with the ingest's imports, "
                     f"{res.get('ours_peak_arrow', 0) / mb:,.0f} MiB Arrow allocations at most (decoded pages)")
    ok_rss = res["ours_peak_rss"] / mb <= res["goal_rss_mb"]
    speed = ""
    if "ratio_speed" in res:
        ok_speed = res["ratio_speed"] >= res["goal_vs_baseline"]
        speed = (f"speed >= {res['goal_vs_baseline']}x baseline -> {res['ratio_speed']:.2f}x "
                 f"({'met' if ok_speed else 'NOT met'}); ")
    lines.append(f"goal: {speed}peak RSS <= {res['goal_rss_mb']} MB -> "
                 f"{res['ours_peak_rss'] / mb:,.0f} MiB ({'met' if ok_rss else 'NOT met'})")
    return "\n".join(lines)


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the `m2m bench` summary table (rows/s: higher is better; RSS: lower is better)."""
    return [
        {"measure": "ingest Parquet (rows/s)", "ours": res["rows"] / res["ours_seconds"],
         "baseline": res["rows"] / res["baseline_seconds"], "baseline_name": "read_table+np.save",
         "limit": None, "limit_name": ""},
        {"measure": "ingest Parquet peak RSS (MiB, lower=better)", "ours": res["ours_peak_rss"] / (1 << 20),
         "baseline": res["baseline_peak_rss"] / (1 << 20), "baseline_name": "read_table+np.save",
         "limit": None, "limit_name": ""},
    ]
