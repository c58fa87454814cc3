"""The node-local shard cache of remote lakes, against a real S3 API server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import m2m
from m2m.errors import CacheTimeoutError, CorruptShardError
from m2m.lake.cache import ShardCache

from .helpers import dir_bytes, make_lake, unit_rows


def _cache(url: str, directory: str, budget: int) -> ShardCache:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return ShardCache(fs, root, url, directory, budget)


def test_stream_holds_the_byte_budget(s3_bucket, tmp_path):
    url = f"{s3_bucket}/lake"
    files = make_lake(url, 6000)
    biggest = max(b for _, b, _ in files)
    lake_bytes = sum(b for _, b, _ in files)
    budget = 3 * biggest + biggest // 2
    assert lake_bytes > 3 * budget                  # the cache must evict to stream one epoch
    cache_dir = str(tmp_path / "cache")
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], dir_bytes(cache_dir))
            time.sleep(0.002)

    with m2m.open_lake(url, cache_dir=cache_dir, cache_bytes=budget) as lake:
        t = threading.Thread(target=watch)
        t.start()
        try:
            seen = []
            for epoch in range(2):
                dl = lake.export_to_dataloader(batch_size=128, shuffle_mode="block", block_rows=128, epoch=epoch)
                seen.append(sum(len(b) for b in dl))
            stats = lake.snapshot.fetch_stats()
        finally:
            stop.set()
            t.join(10)
    assert seen == [6000, 6000]
    assert stats["evictions"] > 0
    assert 0 < peak[0] <= budget + biggest
    assert dir_bytes(cache_dir) <= budget
    # an evicted entry's lock file goes with it (every shard ever cached left one in .locks)
    locks = [n for n in os.listdir(os.path.join(cache_dir, ".locks")) if n != "cache.lock"]
    cached = [n for n in os.listdir(cache_dir) if n.endswith(".shard")]
    assert len(locks) <= len(cached) + 1, (len(locks), len(cached), len(files))


def test_lru_evicts_the_least_recently_used_shard(s3_bucket, tmp_path):
    url = f"{s3_bucket}/lake"
    files = make_lake(url, 2500)
    assert len(files) >= 5
    size = max(b for _, b, _ in files)
    cache = _cache(url, str(tmp_path / "c"), 3 * size)
    a, b, c, d, e = files[:5]

    def use(f: tuple[str, int, int]) -> None:
        with cache.open(*f):
            pass
        time.sleep(0.02)  # distinct mtimes

    for f in (a, b, c):
        use(f)
    use(a)                                   # a is now more recent than b and c
    use(d)                                   # evicts b, the least recently used
    cached = {f[0] for f in files if os.path.exists(cache.path(f[0]))}
    assert cached == {a[0], c[0], d[0]}
    use(e)                                   # evicts c
    cached = {f[0] for f in files if os.path.exists(cache.path(f[0]))}
    assert cached == {a[0], d[0], e[0]}
    st = cache.stats()
    assert st["fetches"] == {a[0]: 1, b[0]: 1, c[0]: 1, d[0]: 1, e[0]: 1}
    assert st["hits"] == 1 and st["evictions"] == 2
    cache.close()
    assert os.path.isdir(cache.dir)          # a named cache_dir is shared: kept on close


_SHARED_READER = """
import json, os, sys, time
import m2m
url, cache_dir, barrier, me = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
open(os.path.join(barrier, me), "w").close()           # imported: ready
deadline = time.time() + 120
while len(os.listdir(barrier)) < 2 and time.time() < deadline:   # start streaming together
    time.sleep(0.002)
with m2m.open_lake(url, cache_dir=cache_dir, cache_bytes=1 << 30) as lake:
    dl = lake.export_to_dataloader(batch_size=100, shuffle_mode="block", block_rows=100, shard_affinity=False)
    rows = sum(len(b) for b in dl)
    print(json.dumps({"rows": rows, **lake.snapshot.fetch_stats()}))
"""


@pytest.mark.slow
def test_two_processes_share_one_cache_and_download_each_shard_once(s3_bucket, tmp_path):
    url = f"{s3_bucket}/lake"
    files = make_lake(url, 5000)
    cache_dir = str(tmp_path / "shared")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _SHARED_READER, url, cache_dir, str(barrier), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["rows"] for r in results] == [5000, 5000]
    total: dict[str, int] = {}
    for r in results:
        for path, n in r["fetches"].items():
            total[path] = total.get(path, 0) + n
    assert total == {f[0]: 1 for f in files}           # every shard downloaded exactly once on the node
    assert sum(r["fetch_bytes"] for r in results) == sum(f[1] for f in files)
    assert not [n for n in os.listdir(cache_dir) if n.endswith(".part")]


def test_private_cache_is_removed_on_close(s3_bucket, monkeypatch):
    monkeypatch.delenv("M2M_CACHE_DIR", raising=False)
    url = f"{s3_bucket}/lake"
    make_lake(url, 1000)
    lake = m2m.open_lake(url)
    assert len(np.asarray(lake.snapshot.read_all("mu"))) == 1000
    private = lake.snapshot.fs.cache.dir
    assert os.path.isdir(private) and any(n.endswith(".shard") for n in os.listdir(private))
    lake.close()
    assert not os.path.exists(private)


def test_download_is_verified_against_the_manifest(s3_bucket, tmp_path):
    import fsspec

    url = f"{s3_bucket}/lake"
    files = make_lake(url, 1000)
    fs, root = fsspec.core.url_to_fs(url)
    rel, size, _ = files[0]
    data = bytearray(fs.cat_file(f"{root}/{rel}"))
    data[size // 2] ^= 0xFF                          # same size, one flipped byte
    fs.pipe_file(f"{root}/{rel}", bytes(data))
    cache_dir = str(tmp_path / "c")
    with m2m.open_lake(url, cache_dir=cache_dir) as lake:
        with pytest.raises(CorruptShardError, match=rel):
            lake.snapshot.read_all("mu")
    assert not [n for n in os.listdir(cache_dir) if n.endswith((".shard", ".part"))]


def test_cached_names_stay_inside_the_cache_dir(s3_bucket, tmp_path):
    cache = _cache(f"{s3_bucket}/lake", str(tmp_path / "c"), 1 << 20)
    for rel in ("../../etc/passwd", "/abs/path", "_data/..\\..\\x", "a/" * 50 + "b"):
        path = cache.path(rel)
        assert os.path.dirname(path) == cache.dir and path.endswith(".shard")


def test_stale_part_of_a_killed_download_is_reclaimed(s3_bucket, tmp_path):
    url = f"{s3_bucket}/lake"
    files = make_lake(url, 1000)
    size = files[0][1]
    cache = _cache(url, str(tmp_path / "c"), size + 10)
    stale = os.path.join(cache.dir, f"{'0' * 40}.{size}.deadbeef.part")
    with open(stale, "wb") as f:
        f.write(b"x" * 100)                           # reserves `size` bytes, but nobody holds its lock
    with cache.open(*files[0]) as path:
        assert os.path.getsize(path) == size
    assert not os.path.exists(stale)


def test_waiting_for_room_times_out_with_a_clear_error(s3_bucket, tmp_path):
    url = f"{s3_bucket}/lake"
    files = make_lake(url, 1000)
    size = files[0][1]
    cache = _cache(url, str(tmp_path / "c"), size + 10)
    cache.lock_timeout = 0.5
    # a live download elsewhere holds the whole budget: its part is locked by its (simulated) owner
    owner = cache._lock("f" * 40)
    owner.acquire(False, 1, "test")
    try:
        with open(os.path.join(cache.dir, f"{'f' * 40}.{size}.cafe.part"), "wb"):
            pass
        with pytest.raises(CacheTimeoutError, match="no room"):
            with cache.open(*files[0]):
                pass
    finally:
        owner.release()


def test_prefetch_downloads_the_next_shards_in_the_background(s3_bucket, tmp_path):
    url = f"{s3_bucket}/lake"
    files = make_lake(url, 3000)
    cache = _cache(url, str(tmp_path / "c"), 1 << 30)
    assert cache.prefetch(files[:10]) == cache.prefetch_shards   # bounded
    cache.wait_prefetch(60)
    assert sorted(cache.stats()["fetches"]) == sorted(f[0] for f in files[: cache.prefetch_shards])
    with cache.open(*files[0]):
        pass
    assert cache.stats()["hits"] == 1
    cache.close()


def test_writer_keeps_its_shards_in_the_cache_within_budget(s3_bucket, tmp_path):
    url = f"{s3_bucket}/lake"
    cache_dir = str(tmp_path / "c")
    cfg = m2m.M2MConfig(path=url, latent_dim=32, shard_bytes=1 << 16, cache_dir=cache_dir, cache_bytes=150_000)
    with m2m.create_m2m(cfg) as lake:
        lake.add_splats(unit_rows(4000))
        assert len(lake.manifest.shards) >= 5
        assert dir_bytes(cache_dir) <= 150_000
        got = lake.snapshot.read_all("mu")
    np.testing.assert_allclose(got, unit_rows(4000), atol=1e-6)


def test_a_lock_removed_by_its_holder_is_taken_again_on_the_file_at_its_path(tmp_path):
    # the holder of an entry's lock unlinks the lock file as it evicts; one who waited on the old file
    # must not count as holding the entry's lock (a third process would lock a new file at the path)
    from m2m.lake.cache import _FileLock

    path = str(tmp_path / "x.lock")
    evicting = _FileLock(path)
    assert evicting.try_acquire()
    got: list[bool] = []
    waiter = _FileLock(path)
    t = threading.Thread(target=lambda: got.append(waiter.acquire(True, 10, "x") is None))
    t.start()
    time.sleep(0.3)               # the waiter is polling the file evicting holds
    evicting.remove()
    t.join(10)
    assert got == [True] and os.path.exists(path)
    assert os.stat(path).st_ino == os.fstat(waiter._fd).st_ino
    third = _FileLock(path)
    assert not third.try_acquire()  # the waiter's shared lock is on the file at the path: it excludes
    waiter.release()
    assert third.try_acquire()
    third.remove()
    assert not os.path.exists(path)
