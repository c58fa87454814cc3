"""``lake.estimate_kappa(engine="ray")`` (or ``consolidate``) on a local 2-worker Ray cluster vs the local engine.

Both engines run on the same lake contents (manifold embeddings, as ``bench_estimate_kappa.py``):
the local engine with 2 FAISS/torch threads in this process, the Ray engine with 2 single-threaded
Ray workers (``ray.init(num_cpus=2)``). Timed separately: the cluster's start-up (``ray.init``), the
first Ray run (fresh worker processes: each imports torch and FAISS, ``worker_imports``), and
``--ray-repeats`` more Ray runs on the same, now warm, workers; the Ray runs' phases (driver sample +
k-means, calibration, routed search) come from `m2m.ray.geometry.geometry_fields`. Each engine's
recall@k is measured against the exact neighbours of a random sample of rows. ``--op consolidate``
times ``lake.consolidate(0.95, engine=...)`` instead (duplicate search, merge and the new version's
kNN + kappa) on rows with 10% planted near-duplicates (`m2m_bench.consolidate.planted_lake`, d = 384)
and reports the rows each engine keeps instead of a recall. Usage:
python benchmarks/bench_ray.py [--op estimate_kappa|consolidate] [--rows N] [--dim D] [--ray-repeats R] [--json PATH]
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
    parser.add_argument("--ray-repeats", type=int, default=1, help="Ray runs after the first (warm workers)")
    parser.add_argument("--op", choices=("estimate_kappa", "consolidate"), default="estimate_kappa")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Ray starts its workers at nice 15 by default; on this shared machine that starves them behind
    # every other process while the local engine runs at nice 0. Both engines run at nice 0 here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    labels = None
    if args.op == "consolidate":
        from m2m_bench.consolidate import planted_lake

        x, labels, _ = planted_lake(args.rows)
        args.dim = x.shape[1]
    else:
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
    import m2m.ray.geometry as ray_geometry

    fields = ray_geometry.geometry_fields
    phases: dict[str, float] = {}

    def timed_fields(*a, **kw):  # the Ray engine's own phase timings, for the table
        stats: dict[str, object] = {}
        out = fields(*a, stats=stats, **kw)
        phases.update(stats["seconds"])  # type: ignore[arg-type]
        return out

    ray_geometry.geometry_fields = timed_fields
    runs = [("local", "local")] + [("ray", "ray (fresh workers)")] + \
        [("ray", f"ray (warm workers, run {i + 2})") for i in range(args.ray_repeats)]
    try:
        for engine, name in runs:
            cfg = M2MConfig(path=f"{folder}/{len(results)}", latent_dim=args.dim, knn_k=K, seed=0)
            with create_m2m(cfg) as lake:
                lake.add_splats(torch.from_numpy(x), labels=labels)
                phases.clear()
                t0 = time.perf_counter()
                if args.op == "consolidate":
                    report = lake.consolidate(0.95, engine=engine)
                    seconds = time.perf_counter() - t0
                    results[name] = {"seconds": seconds, "rows_after": report.rows_after,
                                     "groups_merged": report.groups_merged, "shards": len(lake.manifest.shards)}
                else:
                    lake.estimate_kappa(threads=2, engine=engine)
                    seconds = time.perf_counter() - t0
                    nbr_pos = lake.snapshot.gather("neighbors", sample)  # row positions = ids here
                    hits = [np.intersect1d(a[a >= 0], b).size for a, b in zip(nbr_pos, exact)]
                    results[name] = {"seconds": seconds, "recall_at_k": float(np.mean(hits)) / K,
                                     "shards": len(lake.manifest.shards)}
                if engine == "ray":
                    results[name]["phases"] = dict(phases)
            shutil.rmtree(cfg.path)
    finally:
        ray.shutdown()
        shutil.rmtree(folder)
    cold = results["ray (fresh workers)"]["seconds"]
    warm_runs = [r["seconds"] for n, r in results.items() if n.startswith("ray (warm")]
    ratio = results["local"]["seconds"] / cold
    quality = (f"rows kept of {args.rows:,} (similarity 0.95)" if args.op == "consolidate"
               else f"recall@{K} vs exact on {SAMPLE} rows")
    print(f"lake.{args.op}(), {args.rows:,} x {args.dim}, k={K}: local engine (2 threads) vs engine='ray' "
          f"(2 local Ray workers; ray.init took {ray_start:.1f} s, not in the rows below); {quality}; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    column = "rows kept" if args.op == "consolidate" else "recall@k"
    print(f"{'engine':34s} {'seconds':>9s} {column:>9s}  phases of the kNN + kappa (s)")
    for name, r in results.items():
        ph = " ".join(f"{k}={v:.1f}" for k, v in r.get("phases", {}).items())
        q = f"{r['rows_after']:9d}" if args.op == "consolidate" else f"{r['recall_at_k']:9.4f}"
        print(f"{name:34s} {r['seconds']:9.1f} {q}  {ph}")
    print(f"local/ray (fresh workers) time ratio: {ratio:.2f}x (>1: Ray faster)")
    if warm_runs:
        print(f"local/ray (warm workers) time ratio: {results['local']['seconds'] / min(warm_runs):.2f}x; fixed "
              f"overhead of fresh workers ~{cold - min(warm_runs):.1f} s (+ {ray_start:.1f} s ray.init)")
    if args.json:
        doc = {"op": args.op, "rows": args.rows, "dim": args.dim, "k": K, "sample": SAMPLE, "ray_start_s": ray_start,
               "results": results, "local_over_ray": ratio,
               "load_average": os.getloadavg(), "host": platform.node(), "date": time.strftime("%F %T"),
               "ray_version": ray.__version__}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
