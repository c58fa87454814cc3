"""Stream benchmark: ours | DataLoader(TensorDataset) | the gather limit (see m2m_bench.stream).

    python benchmarks/bench_stream.py [--quick] [--json] [--rows N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys

from m2m_bench.stream import format_table, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k rows instead of 1M")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rows", type=int, default=None, help="rows in the benchmark lake")
    parser.add_argument("--dir", default=None, help="where to write the temporary lake (default: $TMPDIR)")
    args = parser.parse_args(argv)
    res = run(quick=args.quick, rows=args.rows, directory=args.dir)
    sys.stdout.write((json.dumps(res, indent=2) if args.json else format_table(res)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
