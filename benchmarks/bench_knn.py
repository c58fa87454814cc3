"""knn benchmark (see m2m_bench.knn): python benchmarks/bench_knn.py --help."""

from m2m_bench.knn import main

if __name__ == "__main__":
    raise SystemExit(main())
