"""All-rows kNN benchmark: m2m.index.knn | exact FAISS IndexFlatIP | the GEMM limit, with recall.

    python benchmarks/bench_knn.py [--quick] [--json] [--rows N] [--threads 1,2] [--k 16]
    m2m bench --only knn [--quick]

Data: unit vectors in 384 dims on a curved 12-dimensional manifold (random Fourier features of a
Gaussian mixture, plus noise): nearest-neighbour cosines ~0.82, random pairs ~0.13, neighbourhoods
that do not follow cluster borders -- an IVF partition has to cut through them, as with real text
embeddings. Recall@k of ours is measured against the exact neighbours of 1,000 random rows; the
exact flat search is timed on 2,000 rows and extrapolated to all rows. "limit" is the time the
pairs each method scores take at the matrix-product rate measured in the same run (float32, or
bfloat16 where ours uses it) -- the floor for that method on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import numpy as np
import torch


def embeddings(n: int, d: int = 384, seed: int = 0, intrinsic: int = 12, scale: float = 0.35,
               noise: float = 0.2) -> np.ndarray:
    """``n`` float32 unit rows on a smooth random manifold (see module doc)."""
    g = np.random.default_rng(seed)
    modes = g.standard_normal((256, intrinsic)).astype(np.float32)
    width = g.uniform(0.3, 1.0, 256).astype(np.float32)
    w = (g.standard_normal((intrinsic, d)) * scale).astype(np.float32)
    b = g.uniform(0, 2 * np.pi, d).astype(np.float32)
    mode = g.integers(0, 256, n)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 65_536):
        m = mode[s:s + 65_536]
        z = modes[m] + width[m, None] * g.standard_normal((m.size, intrinsic), dtype=np.float32)
        x = np.cos(z @ w + b) + noise * g.standard_normal((m.size, d), dtype=np.float32)
        out[s:s + m.size] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def gemm_rate(dtype: torch.dtype, threads: int) -> float:
    """Best-of-5 FLOP/s of a [2048, 384] x [384, 512] product (the shape of our list blocks)."""
    torch.set_num_threads(threads)
    a = torch.randn(2048, 384).to(dtype)
    b = torch.randn(512, 384).to(dtype)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b.T
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * 2048 * 512 * 384 / best


def run(quick: bool = False, rows: int | None = None, threads: list[int] | None = None, k: int = 16,
        precision: str = "auto") -> dict[str, Any]:
    """All-rows kNN of ``rows`` (default 1M, quick 200k) manifold vectors: ours vs exact flat vs limit."""
    import faiss

    rows = rows or (200_000 if quick else 1_000_000)
    threads = threads or [1]

    from m2m.index.knn import knn
    from m2m.index.runtime import compute_threads, resolve_precision

    t0 = time.perf_counter()
    x = embeddings(rows)
    res: dict[str, Any] = {"rows": rows, "dim": x.shape[1], "k": k, "generate_s": time.perf_counter() - t0,
                           "runs": []}
    g = np.random.default_rng(1)
    probe = np.sort(g.choice(rows, 1000, replace=False))
    # exact flat: the straightforward FAISS search, timed on 2,000 rows and extrapolated
    with compute_threads(threads[0]):
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        _, truth = index.search(x[probe], k + 1)
        timed = np.sort(g.choice(rows, 2000, replace=False))
        t0 = time.perf_counter()
        index.search(x[timed], k + 1)
        flat_s = (time.perf_counter() - t0) * rows / timed.size
        del index
    truth = np.array([r[r != q][:k] for r, q in zip(truth, probe)])
    used = resolve_precision(precision, x.shape[1])
    for th in threads:
        rate32 = gemm_rate(torch.float32, th)
        rate = gemm_rate(torch.bfloat16, th) if used == "bfloat16" else rate32
        stats: dict[str, Any] = {}
        t0 = time.perf_counter()
        _, idx = knn(x, k, seed=0, threads=th, precision=precision, stats=stats)
        ours_s = time.perf_counter() - t0
        rec = float((idx[probe][:, :, None] == truth[:, None, :]).any(axis=1).mean())
        res["runs"].append({
            "threads": th, "seconds": ours_s, "recall": rec, "stats": stats,
            "gemm_gflops_f32": rate32 / 1e9, "gemm_gflops_used": rate / 1e9,
            "limit_s": stats.get("scored_pairs", rows * rows) * 2 * x.shape[1] / rate,
            "flat_limit_s": rows * rows * 2 * x.shape[1] / rate32,
        })
    res["flat_extrapolated_s"] = flat_s
    return res


def format_table(res: dict[str, Any]) -> str:
    lines = [f"all-rows kNN, {res['rows']:,} x {res['dim']}, k={res['k']} (manifold data; see module doc)",
             f"{'method':<34}{'threads':>8}{'seconds':>10}{'recall@k':>10}{'limit s':>10}"]
    for r in res["runs"]:
        st = r["stats"]
        name = (f"m2m knn ({st.get('method')}, nlist={st.get('nlist')}, nprobe={st.get('nprobe')}, "
                f"{st.get('precision', 'f32')})")
        lines.append(f"{name:<34}{r['threads']:>8}{r['seconds']:>10.1f}{r['recall']:>10.3f}{r['limit_s']:>10.1f}")
        if "seconds" in st:
            lines.append("    phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in st["seconds"].items())
                         + f"; {st['scored_pairs'] / res['rows']:.0f} pairs/row scored")
    r0 = res["runs"][0]
    lines.append(f"{'FAISS IndexFlatIP (extrapolated)':<34}{r0['threads']:>8}{res['flat_extrapolated_s']:>10.1f}"
                 f"{1.0:>10.3f}{r0['flat_limit_s']:>10.1f}")
    lines.append("limit = scored pairs x 2d / matrix-product rate measured in this run "
                 f"({r0['gemm_gflops_used']:.0f} GFLOP/s used, {r0['gemm_gflops_f32']:.0f} float32)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k rows instead of 1M")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rows", type=int, default=None, help="rows (default 1,000,000)")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts to run ours with")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("-v", "--verbose", action="store_true", help="log the phases")
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
        logging.getLogger("faiss").setLevel(logging.WARNING)
    rows = args.rows or (200_000 if args.quick else 1_000_000)
    res = run(rows=rows, threads=[int(t) for t in args.threads.split(",")], k=args.k, precision=args.precision)
    sys.stdout.write((json.dumps(res, indent=2) if args.json else format_table(res)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the `m2m bench` summary table (rows/s of the all-rows kNN graph)."""
    r = res["runs"][0]
    n = res["rows"]
    return [{"measure": f"kNN graph k={res['k']}, recall {r['recall']:.3f} (rows/s)", "ours": n / r["seconds"],
             "baseline": n / res["flat_extrapolated_s"], "baseline_name": "FAISS flat",
             "limit": n / r["limit_s"], "limit_name": "GEMM floor"}]
