"""Parquet ingest benchmark (see m2m_bench.ingest_parquet): time and peak RSS of `m2m ingest` of one
Parquet file vs pq.read_table + np.save + fsync, each in a fresh process.

python benchmarks/bench_ingest_parquet.py [--quick] [--rows N] [--row-groups G] [--no-baseline]
    [--shard-size 64MiB] [--reps R] [--save benchmarks/results/NAME]
"""

import argparse
import json

from m2m_bench.ingest_parquet import format_table, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="20,000 rows (0.2 GB) instead of 100,000 (1 GB)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--row-groups", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true", help="m2m only (read_table of 4 GB needs > 4 GB)")
    ap.add_argument("--shard-size", default=None, help="passed to m2m ingest (default: its 128MiB)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", default=None, help="write NAME.json and NAME.txt")
    a = ap.parse_args()
    res = run(quick=a.quick, rows=a.rows, reps=a.reps, row_groups=a.row_groups, baseline=not a.no_baseline,
              ingest_args=() if a.shard_size is None else ("--shard-size", a.shard_size))
    table = format_table(res)
    print(json.dumps(res, indent=1) if a.json else table)
    if a.save:
        with open(a.save + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(a.save + ".txt", "w") as f:
            f.write(table + "\n")
