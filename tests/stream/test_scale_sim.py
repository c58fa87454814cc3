"""32 ranks of a 1B x 768 float16 lake (same shard structure, rows scaled down) with shard affinity; one
rank of 64 planned over a 1B-row virtual lake (issue 21)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

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


# ----------------------------------------------------------------------------- issue 21: 1B rows, one rank
_SIM_1B = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale_1b_sim.py"


def _sim_1b():
    spec = importlib.util.spec_from_file_location("bench_scale_1b_sim", _SIM_1B)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _check_rank(res: dict, shard_rows: int, world: int) -> None:
    n = res["rows"]
    assert res["rank_rows"] == -(-n // world)                                 # its exact share, no more
    assert res["rank_batches"] == -(-res["rank_rows"] // 1024)
    share_shards = -(-res["rank_rows"] // shard_rows)
    # the rank's slice of the shard order starts and ends inside shards (+1 over the ceiling) and,
    # unaligned, touches RUNS_PER_RANK + 1 runs of consecutive shards; at each end of a run a warm
    # block straddling the boundary loads the neighbouring shard too (+2 per run)
    extra = 1 + 2 * (affinity.RUNS_PER_RANK + 1)
    assert res["shards_read"] <= share_shards + extra                        # its own shards only
    # the plan read the sidecar columns of those shards only (after the masses pass)
    assert res["plan_sidecar_bytes"] <= 8 * shard_rows * (share_shards + extra)


def test_a_small_virtual_lake_plans_one_ranks_share():
    sim = _sim_1b()
    res = sim.run_case("importance", 64, 4096, 17, 64, 1024, 0)
    _check_rank(res, 4096, 64)
    assert res["masses_kappa_bytes"] == 2 * 4 * res["rows"]                   # two passes over kappa, once


@pytest.mark.slow
def test_1b_rows_rank_17_of_64_importance_plan_fits_its_share():
    """4,000 virtual shards x 256k rows, importance sampling (p ∝ 1/kappa) with shard affinity, planned
    for rank 17 of 64 in a subprocess: its plan holds and reads only its share (docs/scale.md)."""
    sim = _sim_1b()
    args = argparse.Namespace(shards=4000, shard_rows=256_000, rank=17, world=64, batch_size=1024, seed=0)
    res = sim.measure("importance", args)
    _check_rank(res, 256_000, 64)
    assert res["rows"] == 1_024_000_000
    assert res["traced_peak_bytes"] <= 2 * res["rank_share_sidecar_bytes"]    # the memory goal
    assert res["peak_rss_bytes"] <= 2 * res["rank_share_sidecar_bytes"]


def test_a_small_virtual_lake_augments_one_ranks_share_by_shard():
    sim = _sim_1b()
    res = sim.run_case("langevin", 64, 4096, 17, 64, 1024, 0)
    _check_rank(res, 4096, 64)
    # the augmenter loaded the terms of the shards the rank streams, each once (its tables fit)
    assert res["terms_distinct_shards"] <= res["shards_read"]
    assert res["terms_shards_loaded"] == res["terms_distinct_shards"]
    assert res["rerun_rows"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1500)   # walks the rank's 16M rows through the tables (~3-10 min here)
def test_1b_rows_rank_17_of_64_langevin_terms_by_shard_fit_its_share():
    """The same rank of the 1B-row virtual lake, augmented with Langevin reading its terms by shard
    (neighbours anywhere in the lake): plan + geometry within 2 x the rank's sidecar share."""
    sim = _sim_1b()
    args = argparse.Namespace(shards=4000, shard_rows=256_000, rank=17, world=64, batch_size=1024, seed=0)
    res = sim.measure("langevin", args)
    _check_rank(res, 256_000, 64)
    assert res["terms_distinct_shards"] <= res["shards_read"]
    # each shard's terms built once: the budget holds the shards the rank's windows draw from (one
    # batch may need more than the budget, ~44 shards where a window spans two groups: all are kept)
    assert res["terms_shards_loaded"] == res["terms_distinct_shards"]
    assert res["peak_rss_bytes"] <= 2 * res["rank_share_sidecar_bytes"]       # the memory goal
