"""Near-duplicate consolidation benchmark: m2m.consolidation.groups | exact brute force | the GEMM limit.

    python benchmarks/bench_consolidate.py [--quick] [--json] [--rows N] [--similarity 0.95]
    m2m bench --only consolidate [--quick]

Data: 90% of the rows are 384-d unit vectors on a curved manifold (benchmarks/bench_knn.py), 10%
are planted near-duplicates of some of them (groups of 2-4, cosine to the source 0.97-0.999),
with 10 labels; 5% of the copies get another label than their source and must not be merged.
Quality: a random 2,000-row sample is searched exhaustively against every row (the exact graph
edges of those rows); "edge recall" is the fraction of those edges whose rows share a group in
ours; "planted recall" the fraction of same-label copies grouped with their source; "mixed
groups" the groups holding rows of more than one planted origin (every edge we report has an
exact cosine >= similarity, so mixing only comes from genuine near-duplicates in the data).
The exact all-pairs search is timed on the sample and extrapolated (N^2 / 2 pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from m2m_bench.knn import embeddings, gemm_rate


def planted_lake(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, labels, origin): rows with 10% planted near-duplicates (see module doc)."""
    g = np.random.default_rng(seed)
    n_copies = rows // 10
    base = embeddings(rows - n_copies, seed=seed)
    labels = g.integers(0, 10, rows - n_copies)
    sources = g.choice(base.shape[0], size=max(1, n_copies // 2), replace=False)
    src = g.choice(sources, size=n_copies)
    sigma = g.uniform(0.05, 0.25, n_copies).astype(np.float32)[:, None]
    copies = base[src] + sigma * g.standard_normal((n_copies, base.shape[1]), dtype=np.float32) / np.sqrt(base.shape[1])
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    copy_labels = labels[src].copy()
    relabel = g.random(n_copies) < 0.05
    copy_labels[relabel] = (copy_labels[relabel] + 1 + g.integers(0, 9, relabel.sum())) % 10
    mu = np.concatenate([base, copies]).astype(np.float32)
    lab = np.concatenate([labels, copy_labels])
    origin = np.concatenate([np.arange(base.shape[0]), src])
    perm = g.permutation(rows)
    return mu[perm], lab[perm], origin[perm]


def run(quick: bool = False, rows: int | None = None, similarity: float = 0.95, threads: int = 1) -> dict[str, Any]:
    """Duplicate groups of ``rows`` (default 200k, quick 50k) planted rows: ours vs exact vs limit."""
    from m2m.index.runtime import compute_threads

    rows = rows or (50_000 if quick else 200_000)
    from m2m.consolidation.groups import find_duplicate_groups, merge_groups

    mu, labels, origin = planted_lake(rows)
    res: dict[str, Any] = {"rows": rows, "dim": mu.shape[1], "similarity": similarity, "threads": threads}
    t0 = time.perf_counter()
    group = find_duplicate_groups(mu, labels, similarity, seed=0, threads=threads)
    res["ours_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = merge_groups(group, mu, np.ones(rows, np.float32))
    res["merge_s"] = time.perf_counter() - t0
    res["rows_after"] = int(merged["size"].size)
    res["alpha_error"] = float(abs(merged["alpha"].astype(np.float64).sum() - rows))

    # exact edges of a sample, by brute force against every row
    g = np.random.default_rng(1)
    sample = np.sort(g.choice(rows, 2000, replace=False))
    with compute_threads(threads):
        t0 = time.perf_counter()
        q = torch.from_numpy(mu[sample])
        us, vs = [], []
        for start in range(0, rows, 65_536):
            hit = (q @ torch.from_numpy(mu[start:start + 65_536]).T >= similarity).numpy()
            a, b = np.nonzero(hit)
            us.append(sample[a])
            vs.append(b + start)
        exact_s = time.perf_counter() - t0
    u, v = np.concatenate(us), np.concatenate(vs)
    keep = (u != v) & (labels[u] == labels[v])
    u, v = u[keep], v[keep]
    res["sample_edges"] = int(u.size)
    res["edge_recall"] = float((group[u] == group[v]).mean()) if u.size else 1.0
    copies = np.nonzero(np.bincount(origin, minlength=origin.max() + 1)[origin] > 1)[0]
    first = np.full(origin.max() + 1, -1)
    first[origin[::-1]] = np.arange(rows)[::-1]
    rep = first[origin[copies]]
    same_label = labels[copies] == labels[rep]
    res["planted_recall"] = float((group[copies] == group[rep])[same_label].mean())
    res["cross_label_merges"] = int(((group[copies] == group[rep]) & ~same_label & (copies != rep)).sum())
    pairs = np.unique(np.stack([group, origin], axis=1), axis=0)
    res["mixed_groups"] = int((np.bincount(pairs[:, 0]) > 1).sum())
    res["exact_extrapolated_s"] = exact_s * rows / sample.size / 2
    rate = gemm_rate(torch.float32, threads)
    res["gemm_gflops_f32"] = rate / 1e9
    res["exact_limit_s"] = rows * rows / 2 * 2 * mu.shape[1] / rate
    return res


def format_table(res: dict[str, Any]) -> str:
    n = res["rows"]
    return "\n".join([
        f"near-duplicate groups, {n:,} x {res['dim']}, cos >= {res['similarity']}, same label "
        f"({res['threads']} thread(s); planted data, see module doc)",
        f"{'method':<36}{'seconds':>9}{'rows/s':>11}{'edge recall':>13}{'planted rec.':>14}",
        f"{'m2m find_duplicate_groups':<36}{res['ours_s']:>9.1f}{n / res['ours_s']:>11,.0f}"
        f"{res['edge_recall']:>13.4f}{res['planted_recall']:>14.4f}",
        f"{'exact brute force (extrapolated)':<36}{res['exact_extrapolated_s']:>9.1f}"
        f"{n / res['exact_extrapolated_s']:>11,.0f}{1.0:>13.4f}{'':>14}",
        f"{'limit: N^2/2 float32 products':<36}{res['exact_limit_s']:>9.1f}{n / res['exact_limit_s']:>11,.0f}",
        f"rows after merge {res['rows_after']:,} (merge_groups {res['merge_s']:.2f} s, alpha error "
        f"{res['alpha_error']:.2e}); sample edges {res['sample_edges']:,}; groups mixing planted origins "
        f"{res['mixed_groups']}; cross-label merges {res['cross_label_merges']}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50k rows instead of 200k")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rows", type=int, default=None, help="rows (default 200,000)")
    parser.add_argument("--similarity", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    res = run(quick=args.quick, rows=args.rows, similarity=args.similarity, threads=args.threads)
    sys.stdout.write((json.dumps(res, indent=2) if args.json else format_table(res)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the `m2m bench` summary table."""
    n = res["rows"]
    return [{"measure": f"near-dup groups, edge recall {res['edge_recall']:.3f} (rows/s)", "ours": n / res["ours_s"],
             "baseline": n / res["exact_extrapolated_s"], "baseline_name": "brute force",
             "limit": n / res["exact_limit_s"], "limit_name": "all-pairs GEMM"}]
