"""A damaged node-cache copy is dropped and downloaded once more; a store copy that is damaged too
gives one `CorruptShardError` naming the remote object (never a cached copy failing forever)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import m2m
from m2m.errors import CorruptShardError

from .helpers import make_lake


def _epoch(lake) -> dict[int, np.ndarray]:
    dl = lake.export_to_dataloader(batch_size=200, columns=("embedding", "id"), shuffle=False)
    out: dict[int, np.ndarray] = {}
    for b in dl:
        for i, row in zip(b["id"].tolist(), b["embedding"].numpy()):
            out[i] = row.copy()
    return out


def _flip_middle(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_cached_copy_is_downloaded_again(s3_bucket, tmp_path) -> None:
    url = f"{s3_bucket}/lake"
    make_lake(url, 3000)
    cache_dir = str(tmp_path / "cache")
    with m2m.open_lake(url, cache_dir=cache_dir) as lake:
        want = _epoch(lake)
    cached = sorted(e.path for e in os.scandir(cache_dir) if e.name.endswith(".shard"))
    assert len(cached) >= 5
    for path in cached[:2]:
        _flip_middle(path)
    os.truncate(cached[2], os.path.getsize(cached[2]) // 2)  # cut short: caught by its size when opened
    with m2m.open_lake(url, cache_dir=cache_dir) as lake:
        for _ in range(2):  # and it stays good
            got = _epoch(lake)
            assert got.keys() == want.keys()
            assert all(np.array_equal(got[i], want[i]) for i in want)
        stats = lake.snapshot.fetch_stats()
    assert stats["invalidations"] == 3 and sum(stats["fetches"].values()) == 3, stats


def test_a_copy_damaged_in_the_store_too_names_the_remote_object(s3_server, s3_bucket, tmp_path) -> None:
    import fsspec

    url = f"{s3_bucket}/lake"
    files = make_lake(url, 3000)
    cache_dir = str(tmp_path / "cache")
    with m2m.open_lake(url, cache_dir=cache_dir) as lake:
        _epoch(lake)
    # the same damage in the cached copy and in the store: the fresh download fails its check too
    rel = files[1][0]
    fs = fsspec.filesystem("s3", **s3_server.storage_options, skip_instance_cache=True)
    remote = f"{url.removeprefix('s3://')}/{rel}"
    data = bytearray(fs.cat_file(remote))
    data[len(data) // 3] ^= 0xFF
    fs.pipe_file(remote, bytes(data))
    from m2m.lake.cache import ShardCache

    name = ShardCache(None, url.removeprefix("s3://"), url, cache_dir, 1 << 30).path(rel)
    _flip_middle(name)
    with m2m.open_lake(url, cache_dir=cache_dir) as lake:
        with pytest.raises(CorruptShardError) as info:
            _epoch(lake)
    text = str(info.value)
    assert f"{url}/{rel}" in text and "\n" not in text, text
