"""consolidate benchmark (see m2m_bench.consolidate): python benchmarks/bench_consolidate.py --help."""

from m2m_bench.consolidate import main

if __name__ == "__main__":
    raise SystemExit(main())
