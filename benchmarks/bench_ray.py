"""``lake.estimate_kappa(engine="ray")`` on a local 2-worker Ray cluster vs the local engine (same data, one run).

Both engines run on the same lake contents (manifold embeddings, as ``bench_estimate_kappa.py``):
the local engine with 2 FAISS/torch threads in this process, the Ray engine with 2 single-threaded
Ray workers (``ray.init(num_cpus=2)``; the cluster's start-up is not timed). Each engine's recall@k
is measured against the exact neighbours of a random sample of rows. Usage:
python benchmarks/bench_ray.py [--rows N] [--dim D] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import torch
from m2m_bench.knn import embeddings

from m2m.api import create_m2m
from m2m.config import M2MConfig
from m2m.index.exact import drop_self, exact_knn_of
from m2m.index.runtime import compute_threads

K = 16
SAMPLE = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Ray starts its workers at nice 15 by default; on this shared machine that starves them behind
    # every other process while the local engine runs at nice 0. Both engines run at nice 0 here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    x = embeddings(args.rows, args.dim, seed=0)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(args.rows, SAMPLE, replace=False))
    with compute_threads(2) as faiss:
        s, i = exact_knn_of(faiss, x, x[sample], K + 1)
        _, exact = drop_self(s, i, sample, K)
    folder = tempfile.mkdtemp()
    results: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - t0
    try:
        for engine in ("local", "ray"):
            cfg = M2MConfig(path=f"{folder}/{engine}", latent_dim=args.dim, knn_k=K, seed=0)
            with create_m2m(cfg) as lake:
                lake.add_splats(torch.from_numpy(x))
                t0 = time.perf_counter()
                lake.estimate_kappa(threads=2, engine=engine)
                seconds = time.perf_counter() - t0
                nbr_pos = lake.snapshot.gather("neighbors", sample)  # row positions = ids here
                hits = [np.intersect1d(a[a >= 0], b).size for a, b in zip(nbr_pos, exact)]
                results[engine] = {"seconds": seconds, "recall_at_k": float(np.mean(hits)) / K,
                                   "shards": len(lake.manifest.shards)}
    finally:
        ray.shutdown()
        shutil.rmtree(folder)
    ratio = results["local"]["seconds"] / results["ray"]["seconds"]
    print(f"lake.estimate_kappa(), {args.rows:,} x {args.dim}, k={K}: local engine (2 threads) vs engine='ray' "
          f"(2 local Ray workers, start-up {ray_start:.1f} s not counted); recall@{K} vs exact on {SAMPLE} rows")
    print(f"{'engine':10s} {'seconds':>9s} {'recall@k':>9s}")
    for engine, r in results.items():
        print(f"{engine:10s} {r['seconds']:9.1f} {r['recall_at_k']:9.4f}")
    print(f"local/ray time ratio: {ratio:.2f}x (>1: Ray faster)")
    if args.json:
        doc = {"rows": args.rows, "dim": args.dim, "k": K, "sample": SAMPLE, "ray_start_s": ray_start,
               "results": results, "local_over_ray": ratio, "host": platform.node(), "date": time.strftime("%F %T"),
               "ray_version": ray.__version__}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
