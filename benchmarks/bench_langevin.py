"""Langevin stream benchmark: ours | the straightforward chain | the gather limit (see m2m_bench.langevin).

    python benchmarks/bench_langevin.py [--quick] [--json] [--rows N]
"""

from __future__ import annotations

import argparse
import json
import sys

from m2m_bench.langevin import format_table, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches, generating kappa")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rows", type=int, default=None, help="rows in RAM (default 100,000)")
    args = parser.parse_args(argv)
    res = run(quick=args.quick, rows=args.rows)
    sys.stdout.write((json.dumps(res, indent=2) if args.json else format_table(res)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
