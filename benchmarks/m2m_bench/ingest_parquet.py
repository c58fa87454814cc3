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
rows, dim, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = np.random.default_rng(0)
x = g.standard_normal((rows, dim), dtype=np.float32)
t = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
              "label": pa.array(np.arange(rows) % 10), "source": pa.array([f"doc{i}" for i in range(rows)])})
pq.write_table(t, path)
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
import json, resource, sys, time
from m2m.cli.main import cli
src, lake = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
try:
    cli(["ingest", src, "--lake", lake, "--label-column", "label", "-q"], prog_name="m2m", standalone_mode=False)
except SystemExit as exc:
    if exc.code:
        raise
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _child(code: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def run(quick: bool = False, rows: int | None = None, dim: int = 2560, reps: int = 1) -> dict[str, Any]:
    """Time and peak RSS of `m2m ingest FILE.parquet` vs read_table + np.save + fsync (see module doc)."""
    n = rows or (20_000 if quick else 100_000)
    tmp = Path(tempfile.mkdtemp(prefix="m2m-bench-ingest-parquet-"))
    src = tmp / "embeddings.parquet"
    try:
        _child(_MAKE, str(n), str(dim), str(src))
        res: dict[str, Any] = {"rows": n, "dim": dim, "file_bytes": src.stat().st_size,
                               "vector_bytes": n * dim * 4, "reps": reps}
        base: list[dict[str, Any]] = []
        ours: list[dict[str, Any]] = []
        for rep in range(reps):
            base.append(_child(_BASELINE, str(src), str(tmp / f"base{rep}.npy")))
            for f in tmp.glob(f"base{rep}.npy*"):
                f.unlink()
            ours.append(_child(_OURS, str(src), str(tmp / f"lake{rep}")))
            shutil.rmtree(tmp / f"lake{rep}")
        res["baseline_seconds"] = min(r["seconds"] for r in base)
        res["ours_seconds"] = min(r["seconds"] for r in ours)
        res["baseline_peak_rss"] = max(r["peak_rss"] for r in base)
        res["ours_peak_rss"] = max(r["peak_rss"] for r in ours)
        res["all_runs"] = {"baseline": base, "ours": ours}
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
    lines = [f"ingest of one Parquet file: {res['rows']:,} x {res['dim']} float32 "
             f"({res['file_bytes'] / 1e9:.2f} GB file), each in a fresh process, best/peak of {res['reps']}",
             f"{'measure':<46}{'seconds':>10}{'rows/s':>12}{'peak RSS MiB':>14}",
             f"{'m2m ingest (ours, durable commit)':<46}{res['ours_seconds']:>10.1f}"
             f"{res['rows'] / res['ours_seconds']:>12,.0f}{res['ours_peak_rss'] / mb:>14,.0f}",
             f"{'pq.read_table + np.save + fsync (baseline)':<46}{res['baseline_seconds']:>10.1f}"
             f"{res['rows'] / res['baseline_seconds']:>12,.0f}{res['baseline_peak_rss'] / mb:>14,.0f}"]
    ok_speed = res["ratio_speed"] >= res["goal_vs_baseline"]
    ok_rss = res["ours_peak_rss"] / mb <= res["goal_rss_mb"]
    lines.append(f"goal: speed >= {res['goal_vs_baseline']}x baseline -> {res['ratio_speed']:.2f}x "
                 f"({'met' if ok_speed else 'NOT met'}); peak RSS <= {res['goal_rss_mb']} MB -> "
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
