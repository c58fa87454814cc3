"""``lake.estimate_kappa(engine="ray")`` (or ``consolidate``) on a local 2-worker Ray cluster vs the local
engine (see m2m_bench.ray_engine): python benchmarks/bench_ray.py --help."""

from __future__ import annotations

import argparse
import json

from m2m_bench.ray_engine import format_table, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--ray-repeats", type=int, default=1, help="Ray runs after the first (warm workers)")
    parser.add_argument("--op", choices=("estimate_kappa", "consolidate"), default="estimate_kappa")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    res = run(rows=args.rows, dim=args.dim, op=args.op, ray_repeats=args.ray_repeats)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
