"""The loss mode's per-epoch planning cost at scale: `m2m.sampling.sharded.shard_masses` over in-memory
float32 priorities (what `ShardedLoss` computes when an epoch's plan is first drawn, before any
batch of that epoch), against one pass of ``np.sum`` over the same array (the memory-bandwidth
floor of touching every priority). Usage:

    python benchmarks/bench_loss_masses.py [--rows 100000000] [--shards 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from m2m.sampling.sharded import shard_masses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--shards", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    offsets = np.linspace(0, args.rows, args.shards + 1).astype(np.int64)
    priorities = np.random.default_rng(0).gamma(1.0, 1.0, args.rows).astype(np.float32)
    ours, floor = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        shard_masses(priorities, offsets, 0.1)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        float(np.sum(priorities, dtype=np.float64))
        floor.append(time.perf_counter() - t)
    o, f = min(ours), min(floor)
    print(f"shard_masses, {args.rows:,} float32 priorities in {args.shards} shards (best of {args.repeats})")
    print(f"ours (shard masses)      {o:8.3f} s   {args.rows / o / 1e6:8.1f} M rows/s")
    print(f"floor (one np.sum pass)  {f:8.3f} s   {args.rows / f / 1e6:8.1f} M rows/s")
    print(f"ours / floor time        {o / f:8.2f}x   -> at 1B rows ~{o * 1e9 / args.rows:.0f} s per epoch start")


if __name__ == "__main__":
    main()
