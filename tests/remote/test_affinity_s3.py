"""Bytes each rank downloads per epoch from a remote lake, with and without shard affinity (moto S3).

Ranks run one after another in this process, each with its own lake handle and its own empty node
cache (sharing nothing, like ranks on different nodes).
"""

from __future__ import annotations

import numpy as np
import pytest

import m2m
from m2m.stream import affinity

from .helpers import make_lake


def _rank_fetches(url: str, tmp_path, world: int, affinity: bool | None, epoch: int = 0):
    out = []
    for rank in range(world):
        cache_dir = str(tmp_path / f"node-{world}-{affinity}-{epoch}-{rank}")
        with m2m.open_lake(url, cache_dir=cache_dir) as lake:
            dl = lake.export_to_dataloader(batch_size=64, shuffle_mode="block", block_rows=64, rank=rank,
                                           world_size=world, epoch=epoch, columns=["id", "embedding"],
                                           shard_affinity=affinity)
            ids = np.concatenate([b["id"].numpy() for b in dl])
            stats = dl.stats()
            out.append((ids, len(dl), stats["fetch"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_shard_affinity_downloads_about_one_lake_per_epoch(s3_bucket, tmp_path, world):
    url = f"{s3_bucket}/lake"
    files = make_lake(url, 24000)
    lake_bytes = sum(b for _, b, _ in files)
    biggest = max(b for _, b, _ in files)
    assert len(files) >= 50
    with m2m.open_lake(url, cache_dir=str(tmp_path / "probe")) as lake:
        offsets = np.concatenate([[0], np.cumsum([s.rows for s in lake.manifest.shards])]).astype(np.int64)
        shard_bytes = np.array([sum(f.bytes for f in s.files) for s in lake.manifest.shards])
        assert np.array_equal(lake.take(np.arange(24000), columns=["id"])["id"], np.arange(24000))  # id = row
    ranks = _rank_fetches(url, tmp_path, world, None)          # auto: on for a block-shuffled remote lake
    ids = np.concatenate([r[0] for r in ranks])
    assert np.array_equal(np.unique(ids), np.arange(24000)) and len(ids) - 24000 < world
    assert len({r[1] for r in ranks}) == 1                       # equal batch counts
    per_rank = [r[2]["fetch_bytes"] for r in ranks]
    assert all(max(r[2]["fetches"].values()) == 1 for r in ranks)
    # each rank downloads exactly the shards its warm blocks cover (the pure plan), each once
    for r in ranks:
        assert r[2]["fetch_bytes"] == shard_bytes[affinity.block_shards(r[0], 64, offsets)].sum()
    extra = affinity.extra_shards_bound(offsets, world) * biggest  # (was 2 * RUNS_PER_RANK + 2: 4 ranks exceeded it)
    assert sum(per_rank) <= lake_bytes + world * extra            # ~1x the lake across all ranks
    assert max(per_rank) <= lake_bytes / world + extra
    plain = _rank_fetches(url, tmp_path, world, False)
    plain_bytes = [r[2]["fetch_bytes"] for r in plain]
    assert min(plain_bytes) >= 0.9 * lake_bytes                 # without it every rank reads ~the lake
    assert sum(plain_bytes) >= 0.9 * world * lake_bytes
    assert sum(per_rank) <= 0.6 * sum(plain_bytes)
