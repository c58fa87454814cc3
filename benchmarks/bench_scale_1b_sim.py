"""A 1B-row lake planned for one rank of 64, with nothing written: plan time, memory and bytes read.

A virtual lake of ``--shards`` shards x ``--shard-rows`` rows (default 4,000 x 256k = 1.024B rows of
768-d float16) exists only as its shard offsets; per-shard kappa and alpha are generated on demand
from (seed, shard) when the plan asks for a shard (what `Snapshot.column(shard, ...)` would read).
Each case runs in a fresh subprocess and computes rank ``--rank`` of ``--world``'s part of epoch 0
through the stream's own call site (`StreamDataset.compute_epoch`), measuring wall time, the peak
RSS above the process's baseline after imports (``VmHWM - VmRSS`` from /proc/self/status) and the
peak of traced allocations (tracemalloc: numpy's arrays), and counting the bytes the rank would
read: shard files its warm arena loads (a block straddling two shards loads both) and the sidecar
columns the plan reads. Cases:

* ``importance``: shard affinity + `m2m.sampling.sharded.ShardedImportance` (p ∝ 1/kappa), the
  per-shard masses computed first (two passes over every shard's kappa, timed apart) then the plan;
* ``affinity``: shard affinity, uniform (no plan);
* ``block-local`` / ``full-local``: no affinity, the rank-local block / Feistel full orders;
* ``langevin``: shard affinity, uniform, then the Langevin augmenter reading its terms by shard
  (`LangevinAugmenter.by_shard` over virtual sidecars: neighbours anywhere in the lake) walks the
  rank's rows in stream order, one batch at a time (``prepare`` without the direction Gaussians,
  and the components of the rows it would rerun): the peak RSS is then plan + geometry.

    python benchmarks/bench_scale_1b_sim.py [--cases importance,affinity] [--json OUT] [--txt OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np

DIM = 768
ROW_BYTES = DIM * 2 + 8 + 4 + 4            # nominal row bytes of a stream: mu + id + kappa + alpha
SHARD_ROW_BYTES = DIM * 2 + 24             # shard file bytes per row (mu, id, kappa, alpha, label)
SIDECAR_ROW_BYTES = 4 + 4 + 16 * (8 + 4)   # kappa + alpha + 16 neighbour ids (int64) and cosines
WARM_BYTES = 4 << 30
CACHE_BYTES = 16 << 30                      # one node cache, one rank per node
CASES = ("importance", "affinity", "block-local", "full-local", "langevin")
K = 16


class VirtualTerms:
    """`m2m.augment.tables.SplatTerms` of the virtual lake: per-shard terms generated from (seed,
    shard) when the augmenter asks (what `SnapshotTerms` reads from a shard and its sidecar)."""

    def __init__(self, offsets: np.ndarray, seed: int) -> None:
        self.shard_offsets, self.seed, self.k = offsets, seed, K
        self.loaded: list[int] = []

    def kappa(self, shard: int) -> np.ndarray:
        rows = int(self.shard_offsets[shard + 1] - self.shard_offsets[shard])
        return synthetic_kappa(self.seed, shard, rows)

    def terms(self, shard: int):  # noqa: ANN201
        from m2m.augment.tables import ShardTerms

        self.loaded.append(shard)
        rows = int(self.shard_offsets[shard + 1] - self.shard_offsets[shard])
        rng = np.random.default_rng([self.seed, shard, 1])
        total = int(self.shard_offsets[-1])
        return ShardTerms(kappa=self.kappa(shard), alpha=np.ones(rows, np.float32),
                          neighbors=rng.integers(0, total, (rows, K), dtype=np.int64),
                          # close neighbours, so most rows keep their path terms (near the worst case)
                          neighbor_cos=rng.uniform(0.95, 0.999, (rows, K)).astype(np.float32),
                          neighbor_kappa=(50.0 + 450.0 * rng.random((rows, K), dtype=np.float32)),
                          neighbor_alpha=np.ones((rows, K), np.float32), same_label=None)


class VirtualLake:
    """Only what planning reads of a source: its row count and shard offsets (no data)."""

    def __init__(self, shards: int, shard_rows: int) -> None:
        self.shard_offsets = np.arange(shards + 1, dtype=np.int64) * shard_rows
        self.num_rows = int(self.shard_offsets[-1])


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def synthetic_kappa(seed: int, shard: int, rows: int) -> np.ndarray:
    return (50.0 + 450.0 * np.random.default_rng([seed, shard]).random(rows, dtype=np.float32))


def run_case(case: str, shards: int, shard_rows: int, rank: int, world: int, batch_size: int, seed: int) -> dict:
    from m2m.sampling.sharded import ShardedImportance
    from m2m.stream import order
    from m2m.stream.dataset import StreamDataset
    from m2m.stream.spec import StreamSpec
    from m2m.stream.topology import World

    lake = VirtualLake(shards, shard_rows)
    n = lake.num_rows
    mode = "full" if case == "full-local" else "block"
    layout = order.choose_layout(n, ROW_BYTES, WARM_BYTES, True, mode)
    aff = case in ("importance", "affinity", "langevin")
    group_blocks = max(layout.window_blocks, (CACHE_BYTES // 2) // (layout.block_rows * ROW_BYTES)) if aff else 0
    spec = StreamSpec(columns=(), layout=layout, num_rows=n, batch_size=batch_size, drop_last=False, seed=seed,
                      rank=rank, world_size=world, chunk_batches=1, warm_bytes=WARM_BYTES, shard_affinity=aff,
                      affinity_group_blocks=group_blocks, rank_local_order=order.rank_local(n))
    read = {"kappa_rows": 0, "alpha_rows": 0}

    def kappa_of(i: int) -> np.ndarray:
        read["kappa_rows"] += shard_rows
        return 1.0 / synthetic_kappa(seed, i, shard_rows)

    def alpha_of(i: int) -> np.ndarray:
        read["alpha_rows"] += shard_rows
        return np.ones(shard_rows, dtype=np.float32)

    sampler = ShardedImportance(lake.shard_offsets, kappa_of, alpha_of, seed=seed) if case == "importance" else None
    ds = StreamDataset(lake, spec, None, sampler)  # type: ignore[arg-type]
    base_rss = status_kib("VmRSS")
    tracemalloc.start()
    out: dict = {"case": case, "rows": n, "shards": shards, "rank": rank, "world": world,
                 "block_rows": layout.block_rows, "window_blocks": layout.window_blocks,
                 "group_blocks": group_blocks}
    t0, c0 = time.perf_counter(), time.process_time()
    if sampler is not None:
        sampler.masses()
        out["masses_s"] = time.perf_counter() - t0
        out["masses_cpu_s"] = time.process_time() - c0
        out["masses_kappa_bytes"] = read["kappa_rows"] * 4
        read["kappa_rows"] = 0
    t1, c1 = time.perf_counter(), time.process_time()
    part = ds.compute_epoch(0, World(rank, world))
    out["plan_s"] = time.perf_counter() - t1
    out["plan_cpu_s"] = time.process_time() - c1
    if case == "langevin":
        out.update(walk_langevin(lake, part.rows, batch_size, seed))
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["peak_rss_bytes"] = (status_kib("VmHWM") - base_rss) * 1024
    out["traced_peak_bytes"] = int(traced_peak)
    out["rank_rows"] = int(len(part.rows))
    out["rank_batches"] = int(part.num_batches)
    out["result_bytes"] = int(part.rows.nbytes + (0 if part.weights is None else part.weights.nbytes))
    out["plan_sidecar_bytes"] = read["kappa_rows"] * 4 + read["alpha_rows"] * 4
    b = part.rows // layout.block_rows                                   # warm arena: whole blocks
    first = np.searchsorted(lake.shard_offsets, b * layout.block_rows, side="right") - 1
    last = np.searchsorted(lake.shard_offsets, np.minimum((b + 1) * layout.block_rows, n) - 1, side="right") - 1
    touched = np.unique(np.concatenate([first, last]))
    out["shards_read"] = int(len(touched))
    out["shard_bytes_read"] = int(len(touched)) * shard_rows * SHARD_ROW_BYTES
    out["rank_share_shard_bytes"] = n * SHARD_ROW_BYTES // world
    out["rank_share_sidecar_bytes"] = n * SIDECAR_ROW_BYTES // world
    out["sidecar_bytes_if_loaded_by_shard"] = int(len(touched)) * shard_rows * SIDECAR_ROW_BYTES
    return out


def walk_langevin(lake: VirtualLake, rows: np.ndarray, batch_size: int, seed: int) -> dict:
    """Augment the rank's rows in stream order with a by-shard Langevin augmenter (its tables only:
    ``prepare`` and the rerun rows' components; no vectors exist)."""
    import torch

    from m2m.augment.augmenter import LangevinAugmenter
    from m2m.augment.tables import DEFAULT_TERMS_BYTES

    terms = VirtualTerms(lake.shard_offsets, seed)
    aug = LangevinAugmenter.by_shard(terms, terms_bytes=DEFAULT_TERMS_BYTES)
    t0, c0 = time.perf_counter(), time.process_time()
    reruns = 0
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(rows), batch_size):
        r = torch.from_numpy(rows[start:start + batch_size])
        draws = aug.prepare(r, DIM, gen, draw_gaussian=False)
        if draws.fail.numel():
            aug._tables(torch.device("cpu"), DIM, None).components(r[draws.fail])
            reruns += int(draws.fail.numel())
    cache = aug._sharded(DIM).cache
    slow = [float((t.slot >= 0).mean()) for t, _ in cache._items.values()]
    return {"augment_s": time.perf_counter() - t0, "augment_cpu_s": time.process_time() - c0,
            "terms_shards_loaded": len(terms.loaded), "terms_distinct_shards": len(set(terms.loaded)),
            "terms_cache_peak_bytes": cache.peak_bytes, "terms_budget_bytes": DEFAULT_TERMS_BYTES,
            "rerun_rows": reruns, "slow_fraction": float(np.mean(slow)) if slow else 0.0}


def measure(case: str, args: argparse.Namespace) -> dict:
    """``case`` in a fresh interpreter (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--child", case, "--shards", str(args.shards), "--shard-rows",
           str(args.shard_rows), "--rank", str(args.rank), "--world", str(args.world), "--batch-size",
           str(args.batch_size), "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"case {case} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    gb = 1e9
    lines = ["| case | plan (CPU) | masses (CPU) | peak RSS | traced peak | rank rows | shards read | shard bytes read / share "
             "| plan sidecar read | rank's sidecar share |", "|---" * 10 + "|"]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['plan_s']:.1f} s ({r['plan_cpu_s']:.1f} s) "
            f"| {r.get('masses_s', 0):.1f} s ({r.get('masses_cpu_s', 0):.1f} s) | {r['peak_rss_bytes'] / gb:.2f} GB "
            f"| {r['traced_peak_bytes'] / gb:.2f} GB | {r['rank_rows']:,} | {r['shards_read']} "
            f"| {r['shard_bytes_read'] / r['rank_share_shard_bytes']:.3f} | {r['plan_sidecar_bytes'] / gb:.2f} GB "
            f"| {r['rank_share_sidecar_bytes'] / gb:.2f} GB |")
    for r in results:
        if "augment_s" in r:
            lines.append(f"\n{r['case']}: augmenting the rank's {r['rank_rows']:,} rows took {r['augment_s']:.1f} s "
                         f"({r['augment_cpu_s']:.1f} s CPU); terms of {r['terms_distinct_shards']} shards loaded "
                         f"{r['terms_shards_loaded']} times; {100 * r['slow_fraction']:.0f}% of rows keep path terms; "
                         f"tables peaked at {r['terms_cache_peak_bytes'] / gb:.2f} GB "
                         f"(budget {r['terms_budget_bytes'] / gb:.2f} GB); peak RSS plan + geometry "
                         f"{r['peak_rss_bytes'] / gb:.2f} GB vs 2 x the rank's sidecar share "
                         f"{2 * r['rank_share_sidecar_bytes'] / gb:.2f} GB")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4000)
    ap.add_argument("--shard-rows", type=int, default=256_000)
    ap.add_argument("--rank", type=int, default=17)
    ap.add_argument("--world", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--txt", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.shards, args.shard_rows, args.rank, args.world, args.batch_size,
                                  args.seed)))
        return
    results = []
    for case in args.cases.split(","):
        results.append(measure(case, args))
        print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(text)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg": os.getloadavg(),
            "cpus": os.cpu_count()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    if args.txt:
        with open(args.txt, "w") as f:
            f.write(f"{meta}\n{text}\n")


if __name__ == "__main__":
    main()
