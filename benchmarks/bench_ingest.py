"""Ingest benchmark (see m2m_bench.ingest): python benchmarks/bench_ingest.py [--quick] [--json] [--rows N]."""

import argparse
import json

import torch
from m2m_bench.ingest import format_table, run

if __name__ == "__main__":
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rows", type=int, default=None)
    a = ap.parse_args()
    res = run(quick=a.quick, rows=a.rows)
    print(json.dumps(res, indent=1) if a.json else format_table(res))
