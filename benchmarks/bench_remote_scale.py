"""Simulation of one epoch of a 1B x 768 float16 lake streamed by W ranks with shard affinity.

Same shard structure as the real lake (shard count, blocks per shard, blocks per window; rows per
shard scaled down), computed with the stream's own order functions (`m2m.stream.affinity`,
`m2m.stream.order`). For each rank: rows read, batches, and the shards it downloads when its warm
arena loads whole blocks (a block straddling two shards downloads both), in real bytes (128 MiB
shards): with a cache holding the rank's whole share, and through an LRU node cache of
``--cache-gib`` read one window at a time. Checks exact coverage and equal batch counts. No data is
moved.

    python benchmarks/bench_remote_scale.py [--world 32] [--cache-gib 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import OrderedDict

import numpy as np

from m2m.lake.writer import shard_rows
from m2m.stream import affinity, order

ROWS = 1_000_000_000
DIM = 768
DTYPE = "float16"
SHARD_BYTES = 128 << 20                 # M2MConfig.shard_bytes default
WARM_BYTES = 4 << 30                    # M2MConfig.warm_bytes default
ROW_BYTES = DIM * 2 + 8 + 4 + 4         # nominal_row_bytes: mu + id + kappa + alpha
SIM_SHARD_ROWS = 95                     # rows per shard in the simulation


def real_shape() -> dict[str, int]:
    rows_per_shard = shard_rows(DIM, DTYPE, SHARD_BYTES)
    layout = order.choose_layout(ROWS, ROW_BYTES, WARM_BYTES, True, "block")
    return {"rows_per_shard": rows_per_shard, "shards": math.ceil(ROWS / rows_per_shard),
            "block_rows": layout.block_rows, "window_blocks": layout.window_blocks,
            "shard_file_bytes": rows_per_shard * (DIM * 2 + 24)}


def simulate(world: int, batch_size: int = 8, epoch: int = 0, plain_ranks: int = 2, seed: int = 0,
             cache_bytes: int = 16 << 30) -> dict:
    """One epoch of ``world`` ranks; ``cache_bytes``: each node cache's budget (one rank per node)."""
    real = real_shape()
    shards = real["shards"]
    blocks_per_shard = real["rows_per_shard"] / real["block_rows"]
    block_rows = max(1, round(SIM_SHARD_ROWS / blocks_per_shard))
    sizes = np.full(shards, SIM_SHARD_ROWS, dtype=np.int64)
    sizes[-1] = max(1, round(SIM_SHARD_ROWS * (ROWS - (shards - 1) * real["rows_per_shard"]) / real["rows_per_shard"]))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    file_bytes = np.full(shards, real["shard_file_bytes"], dtype=np.int64)
    lake_bytes = int(file_bytes.sum())
    layout = order.Layout("block", block_rows, real["window_blocks"])
    # what make_loader picks for a remote lake: groups of half the node cache
    group_blocks = max(layout.window_blocks, (cache_bytes // 2) // (real["block_rows"] * ROW_BYTES))
    window_rows = block_rows * layout.window_blocks
    cache_shards = max(1, cache_bytes // real["shard_file_bytes"])

    def block_shards(rows: np.ndarray) -> np.ndarray:
        """Per row: (first, last) shard of the block holding it (a block load downloads both)."""
        b = rows // block_rows
        first = np.searchsorted(offsets, b * block_rows, side="right") - 1
        last = np.searchsorted(offsets, np.minimum((b + 1) * block_rows, n) - 1, side="right") - 1
        return np.stack([first, last], axis=1)

    def fetched(rows: np.ndarray) -> tuple[int, int]:
        """(shards, bytes) a rank downloads with a cache holding its whole share."""
        touched = np.unique(block_shards(rows))
        return len(touched), int(file_bytes[touched].sum())

    def lru_bytes(rows: np.ndarray) -> int:
        """Bytes downloaded through an LRU cache of ``cache_shards`` shards, the order read one window
        (``window_rows`` positions) at a time."""
        pairs = block_shards(rows)
        cache: OrderedDict[int, None] = OrderedDict()
        total = 0
        for lo in range(0, len(rows), window_rows):
            for sh in np.unique(pairs[lo: lo + window_rows]).tolist():
                if sh in cache:
                    cache.move_to_end(sh)
                    continue
                total += int(file_bytes[sh])
                cache[sh] = None
                if len(cache) > cache_shards:
                    cache.popitem(last=False)
        return total

    t0 = time.perf_counter()
    counts = np.zeros(n, dtype=np.int32)
    ranks = []
    for r in range(world):
        part = affinity.rank_epoch(layout, offsets, batch_size, False, seed, epoch, r, world, None, group_blocks)
        np.add.at(counts, part.rows, 1)
        k, b = fetched(part.rows)
        ranks.append({"rank": r, "rows": len(part.rows), "batches": part.num_batches, "shards": k, "bytes": b,
                      "bytes_lru": lru_bytes(part.rows)})
    elapsed = time.perf_counter() - t0
    one_group = affinity.rank_epoch(layout, offsets, batch_size, False, seed, epoch, 0, world)
    plain = []
    for r in range(min(plain_ranks, world)):
        part = order.rank_epoch(layout, n, batch_size, False, seed, epoch, r, world)
        k, b = fetched(part.rows)
        plain.append({"rank": r, "shards": k, "bytes": b})
    per_rank = [x["bytes"] for x in ranks]
    share = lake_bytes / world
    return {
        "real": {**real, "rows": ROWS, "dim": DIM, "dtype": DTYPE, "lake_bytes": lake_bytes},
        "sim": {"world": world, "shards": shards, "rows": n, "shard_rows": SIM_SHARD_ROWS, "block_rows": block_rows,
                "window_blocks": layout.window_blocks, "group_blocks": group_blocks, "batch_size": batch_size,
                "cache_bytes": cache_bytes, "cache_shards": cache_shards, "seconds": elapsed},
        "coverage_min": int(counts.min()), "coverage_max": int(counts.max()), "padding_rows": int(counts.sum() - n),
        "batches_per_rank": sorted({x["batches"] for x in ranks}),
        "ranks": ranks,
        "bytes_total_over_lake": sum(per_rank) / lake_bytes,
        "bytes_max_rank_over_share": max(per_rank) / share,
        "lru_bytes_total_over_lake": sum(x["bytes_lru"] for x in ranks) / lake_bytes,
        "lru_bytes_max_rank_over_share": max(x["bytes_lru"] for x in ranks) / share,
        "one_group_lru_rank0_over_share": lru_bytes(one_group.rows) / share,
        "plain_ranks": plain,
        "plain_bytes_rank_over_lake": [x["bytes"] / lake_bytes for x in plain],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=32)
    ap.add_argument("--cache-gib", type=int, default=16, help="node cache budget (one rank per node)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = simulate(args.world, cache_bytes=args.cache_gib << 30)
    summary = {k: v for k, v in res.items() if k != "ranks"}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
