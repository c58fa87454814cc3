"""Langevin stream rate with whole-lake tables vs terms read by shard, on the same lake, interleaved.

The stream switches to `LangevinAugmenter.by_shard` above `m2m.stream.from_lake.TERMS_BYTES` of
whole-lake tables (docs/augmentation.md, "Terms by shard"); this forces each path on one lake
(clustered rows plus scattered ones, so some rows rerun and some do not), block shuffle, batch 256,
each round a new loader (its tables built again). Prints rows/s wall and per CPU-second. Usage:

    python benchmarks/bench_terms_by_shard.py [--rows 200000] [--dim 256] [--lake PATH] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

import m2m.stream.from_lake as from_lake
from m2m import M2MConfig, create_m2m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--lake", default=None, help="reuse (or create) the lake here; default: a temporary one")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = args.lake or os.path.join(tempfile.mkdtemp(), "lake")
    fresh = not os.path.exists(path)
    with create_m2m(M2MConfig(path=path, latent_dim=args.dim, shard_bytes=4 << 20)) as lake:
        if fresh:
            g = np.random.default_rng(0)
            centres = g.standard_normal((200, args.dim)).astype(np.float32)
            x = centres[g.integers(0, 200, args.rows)] + 0.35 * g.standard_normal((args.rows, args.dim)).astype(np.float32)
            scattered = g.random(args.rows) < 0.5
            x[scattered] = g.standard_normal((int(scattered.sum()), args.dim)).astype(np.float32)
            lake.add_splats(torch.from_numpy(x))
            t = time.perf_counter()
            lake.estimate_kappa()
            print(f"estimate_kappa {time.perf_counter() - t:.1f} s, {len(lake.manifest.shards)} shards", flush=True)
        rates: dict[str, list[tuple[float, float]]] = {"whole": [], "by_shard": []}
        for r in range(args.rounds):
            for name, threshold in (("whole", 1 << 62), ("by_shard", 0)):
                from_lake.TERMS_BYTES = threshold
                dl = lake.export_to_dataloader(batch_size=256, generate_samples=True, shuffle_mode="block", seed=r)
                assert (dl.augment._terms is not None) == (name == "by_shard")
                t0, c0 = time.perf_counter(), time.process_time()
                rows = sum(len(b) for b in dl)
                rates[name].append((rows / (time.perf_counter() - t0), rows / (time.process_time() - c0)))
                print(f"{name} round {r}: {rates[name][-1][0]:,.0f} rows/s wall, {rates[name][-1][1]:,.0f} rows/CPU-s",
                      flush=True)
    for name, v in rates.items():
        print(f"{name}: median {np.median([a for a, _ in v]):,.0f} rows/s wall, "
              f"{np.median([b for _, b in v]):,.0f} rows per CPU-s")


if __name__ == "__main__":
    main()
