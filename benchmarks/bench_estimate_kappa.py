"""End-to-end ``lake.estimate_kappa()`` on a 1M x 384 lake: default threads vs one thread.

The kNN inside it is benchmarked against FAISS flat and the GEMM floor by ``bench_knn.py``; this
script times the whole operation a user runs (read mu, kNN graph, kappa, sidecar commit) on the
same manifold data, in one process, alternating thread settings. Usage:
python benchmarks/bench_estimate_kappa.py [--rows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch
from m2m_bench.knn import embeddings

from m2m.api import create_m2m
from m2m.config import M2MConfig
from m2m.index.runtime import usable_cores

GOAL_SECONDS = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = embeddings(args.rows, 384, seed=0)
    folder = tempfile.mkdtemp()
    times: dict[str, list[float]] = {f"default ({usable_cores()} threads)": [], "threads=1": []}
    try:
        with create_m2m(M2MConfig(path=f"{folder}/lake", latent_dim=384, knn_k=16, seed=0)) as lake:
            lake.add_splats(torch.from_numpy(x))
            for _ in range(args.rounds):
                for label, threads in zip(times, (None, 1)):
                    t0 = time.perf_counter()
                    lake.estimate_kappa(threads=threads)
                    times[label].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(folder)
    print(f"lake.estimate_kappa(), {args.rows:,} x 384, k=16 (read, kNN, kappa, commit); goal <= {GOAL_SECONDS:.0f} s")
    print(f"{'setting':28s} {'seconds (each round)':>28s} {'best':>8s} {'goal':>6s}")
    for label, ts in times.items():
        best = min(ts)
        print(f"{label:28s} {', '.join(f'{t:.1f}' for t in ts):>28s} {best:8.1f} "
              f"{'met' if best <= GOAL_SECONDS else 'NOT met':>6s}")


if __name__ == "__main__":
    main()
