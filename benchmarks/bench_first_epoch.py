"""The stream's speed rows of issue 20 in one run (see m2m_bench.first_epoch): first epoch page-cached
and evicted, steady epoch, float16 storage and out-of-core; ours | numpy memmap loop | physical limit.

    python benchmarks/bench_first_epoch.py [--rows 400000] [--rounds 3] [--dir DIR] [--save NAME]

``--save NAME`` writes benchmarks/results/NAME-<date>.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from m2m_bench.first_epoch import format_table, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="rows (default 400,000: 1.03 GB in float32)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--dir", default=None, help="where to write the temporary data (default: $TMPDIR)")
    parser.add_argument("--save", default=None, help="save under benchmarks/results/SAVE-<date>.{json,txt}")
    args = parser.parse_args(argv)
    t0 = time.time()
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    res = run(rows=args.rows, rounds=args.rounds, directory=args.dir)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    date = time.strftime("%Y-%m-%d", time.gmtime())
    res["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": __import__("os").cpu_count(),
                      "loadavg_before": load_before, "loadavg_at_end": load, "seconds": time.time() - t0,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    table = (format_table(res) + f"\n{res['machine']['date']}, {res['machine']['seconds']:.0f} s; loadavg before "
             f"{' '.join(load_before)}, at the end {' '.join(load)} ({res['machine']['cpus']} cores)")
    sys.stdout.write(table + "\n")
    if args.save:
        out = Path(__file__).resolve().parent / "results"
        (out / f"{args.save}-{date}.json").write_text(json.dumps(res, indent=1, default=str))
        (out / f"{args.save}-{date}.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
