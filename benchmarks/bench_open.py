"""What the manifest-v2 integrity checks cost when a lake is opened and verified.

    PYTHONPATH=src python benchmarks/bench_open.py [--files 400] [--dim 64] [--repeat 5] [--json OUT]

Builds a local lake of ``--files`` shard files (64 KiB shards) and times, alternating in one run:
parsing the newest manifest (checksum + layout checks) vs `json.loads` of it; `open_lake` with the
footer cross-checks vs with them switched off (what opening cost before); `Lake.verify` (CRC32 + full
footer and id checks) vs the CRC32-only loop it replaced. Prints a table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def timed(fn: Callable[[], Any], repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import m2m.lake.reader as reader
    from m2m import M2MConfig, create_m2m, open_lake
    from m2m.lake.manifest import Manifest
    from m2m.lake.shard import verify_file
    from m2m.lake.writer import shard_rows

    tmp = Path(tempfile.mkdtemp(prefix="m2m-bench-open-"))
    path = tmp / "lake"
    per = shard_rows(a.dim, "float32", 1 << 16)
    rows = per * a.files
    with create_m2m(M2MConfig(path=path, latent_dim=a.dim, shard_bytes=1 << 16)) as lake:
        lake.add_splats(np.random.default_rng(0).standard_normal((rows, a.dim), dtype=np.float32))
        m = lake.manifest
    data = sorted((path / "_manifests").glob("v*.json"))[-1].read_bytes()
    real_check = reader.check_footers

    def open_close() -> None:
        open_lake(path).close()

    def open_unchecked() -> None:
        reader.check_footers = lambda *args, **kw: None  # what opening did before the cross-checks
        try:
            open_lake(path).close()
        finally:
            reader.check_footers = real_check

    def verify_new() -> None:
        with open_lake(path) as lk:
            assert lk.verify() == []

    def verify_crc_only() -> None:
        with open_lake(path) as lk:
            for f in lk.manifest.files():
                verify_file(lk._fs, f)

    results: dict[str, Any] = {"files": len(m.files()), "rows": m.rows, "dim": a.dim, "bytes": m.bytes,
                               "manifest_bytes": len(data), "repeat": a.repeat}
    pairs = [("parse manifest (checksum + layout)", lambda: Manifest.from_json(data, "x"), "json.loads only",
              lambda: json.loads(data)),
             ("open_lake with footer checks", open_close, "open_lake without them", open_unchecked),
             ("verify: CRC32 + footers + ids", verify_new, "CRC32 only (before)", verify_crc_only)]
    rows_out = []
    for ours_name, ours, base_name, base in pairs:
        ours(), base()   # warm the page cache and imports
        t_ours = timed(ours, a.repeat)
        t_base = timed(base, a.repeat)
        rows_out.append((ours_name, t_ours, base_name, t_base))
        results[ours_name] = {"ours_s": t_ours, "baseline": base_name, "baseline_s": t_base,
                              "ratio": t_ours / t_base if t_base else None}
    print(f"lake: {results['files']} files, {rows:,} rows x {a.dim}, {m.bytes / 1e6:.1f} MB, "
          f"manifest {len(data) / 1e3:.0f} kB; median of {a.repeat}")
    print(f"{'ours':<38} {'s':>8} | {'baseline':<26} {'s':>8} | ratio")
    for ours_name, t_ours, base_name, t_base in rows_out:
        print(f"{ours_name:<38} {t_ours:8.4f} | {base_name:<26} {t_base:8.4f} | {t_ours / t_base:5.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
