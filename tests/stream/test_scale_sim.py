"""32 ranks of a 1B x 768 float16 lake (same shard structure, rows scaled down) with shard affinity."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from m2m.stream import affinity

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_remote_scale.py"


def _sim():
    spec = importlib.util.spec_from_file_location("bench_remote_scale", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_32_ranks_cover_the_epoch_and_download_about_one_lake():
    world = 32
    res = _sim().simulate(world, plain_ranks=1)
    real = res["real"]
    assert res["sim"]["shards"] == real["shards"] > 10_000
    assert res["coverage_min"] == 1 and res["padding_rows"] < world         # every row, < W padding
    assert len(res["batches_per_rank"]) == 1                                 # equal batch counts
    share = real["lake_bytes"] / world
    extra = (2 * affinity.RUNS_PER_RANK + 2) * real["shard_file_bytes"]
    assert all(r["bytes"] <= share + extra for r in res["ranks"])
    assert res["bytes_total_over_lake"] <= 1.05
    # through a 16 GiB LRU node cache (128 shards, < a rank's ~357): still ~1x, thanks to the groups
    assert res["lru_bytes_total_over_lake"] <= 1.06
    assert res["one_group_lru_rank0_over_share"] > 5                        # plain windows re-read shards
    assert res["plain_bytes_rank_over_lake"][0] > 0.5                       # without affinity: W x ~0.65
