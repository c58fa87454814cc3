"""consolidate benchmark (see m2m.bench.consolidate): python benchmarks/bench_consolidate.py --help."""

from m2m.bench.consolidate import main

if __name__ == "__main__":
    raise SystemExit(main())
