"""Stream 1 GB vs the numpy memmap loop, with and without block checks (see m2m_bench.stream_memmap).

    python benchmarks/bench_stream_memmap.py [--quick] [--rows N] [--rounds R] [--dir DIR] [--save NAME]

``--save NAME`` writes benchmarks/results/NAME.json and NAME.txt.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from m2m_bench.stream_memmap import format_table, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k rows, 2 rounds")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where to write the temporary data (default: $TMPDIR)")
    parser.add_argument("--save", default=None, help="save results under benchmarks/results/SAVE.{json,txt}")
    args = parser.parse_args(argv)
    t0 = time.time()
    res = run(quick=args.quick, rows=args.rows, rounds=args.rounds, directory=args.dir)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    res["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0],
                      "loadavg_at_end": load, "seconds": time.time() - t0,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    table = format_table(res) + f"\nloadavg at the end: {' '.join(load)} (2 cores, shared)"
    sys.stdout.write(table + "\n")
    if args.save:
        out = Path(__file__).resolve().parent / "results"
        (out / f"{args.save}.json").write_text(json.dumps(res, indent=1, default=str))
        (out / f"{args.save}.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
