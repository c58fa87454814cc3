"""The node cache touches only its own files (a probing user, 2026-12-07): a symlink planted at a lock's
name made it create the link's target outside the cache, and its scan evicted or removed any file whose
name merely ended in ``.shard`` or began with ``.tmp-``. Uses fsspec's in-process memory store."""

from __future__ import annotations

import os
import time

import fsspec
import pytest

from m2m.errors import CorruptShardError
from m2m.lake.cache import ShardCache


def _cache(directory: str, budget: int = 1 << 20) -> ShardCache:
    fs = fsspec.filesystem("memory")
    for i in range(4):
        fs.pipe_file(f"/own-cache-test/f{i}.arrow", bytes([i]) * 4000)
    return ShardCache(fs, "/own-cache-test", "memory://own-cache-test", directory, budget)


def test_a_planted_lock_symlink_is_refused_and_its_target_not_made(tmp_path):
    cache_dir, outside = tmp_path / "cache", tmp_path / "outside"
    (cache_dir / ".locks").mkdir(parents=True)
    outside.mkdir()
    (cache_dir / ".locks" / "cache.lock").symlink_to(outside / "planted")
    cache = _cache(str(cache_dir))
    with pytest.raises(CorruptShardError, match="is a symlink"):
        with cache.open("f0.arrow", 4000):
            pass
    assert os.listdir(outside) == []


def test_a_symlinked_lock_folder_is_refused(tmp_path):
    cache_dir, outside = tmp_path / "cache", tmp_path / "outside"
    cache_dir.mkdir()
    outside.mkdir()
    (cache_dir / ".locks").symlink_to(outside)
    with pytest.raises(CorruptShardError, match="is a symlink"):
        _cache(str(cache_dir))
    assert os.listdir(outside) == []


def test_the_scan_evicts_and_removes_only_files_it_named(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    mine = ["model-00001.shard", ".tmp-notes", "notes.part", "x.1.2.part"]
    for name in mine:
        (cache_dir / name).write_bytes(b"user data" * 1000)
        old = time.time() - 7 * 3600  # older than the staged-file age limit
        os.utime(cache_dir / name, (old, old))
    cache = _cache(str(cache_dir), budget=9000)  # room for two of the 4,000-byte files
    for i in range(4):
        with cache.open(f"f{i}.arrow", 4000):
            pass
    left = set(os.listdir(cache_dir))
    assert set(mine) <= left  # the user's files, whatever their names look like
    assert cache.evictions >= 2
