"""What a probing user found on an s3:// lake on 2026-12-07 (each test fails on the code before): a vacuum
with ``min_age_s=0`` deleted the merged file of a compaction published while it listed ``_data`` (an
unreadable head, every commit having returned success); a failed upload left its staged shard in the
cache folder for good; `m2m rollback` / `m2m repair` left a private ``m2m-cache-*`` folder per call."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import M2MError

D, SHARD = 16, 1 << 16


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def test_a_vacuum_keeps_the_files_of_a_version_published_while_it_lists(s3_server, s3_lake_url):
    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=D, shard_bytes=SHARD, storage_options=opts)) as lake:
        for k in range(3):
            lake.add_splats(rows(300, k))  # 3 versions of small shards: a compaction merges them
    with open_lake(s3_lake_url, storage_options=opts) as lake:
        listing = lake._fs.list_detail
        fired: list[int] = []

        def list_detail(rel: str):  # the vacuum has read the versions; a writer publishes, then it lists _data
            if rel == "_data" and not fired:
                with open_lake(s3_lake_url, storage_options=opts) as other:
                    fired.append(other.compact(target_bytes=1 << 22).version)
            return listing(rel)

        lake._fs.list_detail = list_detail
        lake.vacuum(keep=1, min_age_s=0)
    assert fired and fired[0] is not None
    with open_lake(s3_lake_url, storage_options=opts) as lake:
        lake.add_splats(rows(100, 9))  # rebases on the compaction's version
    with open_lake(s3_lake_url, storage_options=opts) as lake:
        assert len(lake) == 1000 and lake.verify() == []
        assert len(lake.take(lake.splats()["id"])["mu"]) == 1000


@pytest.mark.timeout(300)
def test_a_failed_upload_leaves_no_staged_shard_in_the_cache(s3_server_private, tmp_path):
    url, opts = s3_server_private.lake_url(), s3_server_private.storage_options
    cache = tmp_path / "cache"
    with create_m2m(M2MConfig(path=url, latent_dim=D, shard_bytes=SHARD, storage_options=opts)) as lake:
        lake.add_splats(rows(500, 0))

    def pause_once_a_shard_is_staged() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if cache.is_dir() and any(f.startswith(".tmp-") for f in os.listdir(cache)):
                s3_server_private.pause()
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=pause_once_a_shard_is_staged, daemon=True)
    with open_lake(url, storage_options=opts, cache_dir=str(cache), io_timeout=2, io_retries=1,
                   shard_bytes=SHARD) as lake:
        watcher.start()
        with pytest.raises(M2MError):
            lake.add_splats(rows(40000, 7))  # ~40 shards: the pause lands before the last upload
    s3_server_private.resume()
    watcher.join(timeout=5)
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp-")]


def test_rollback_and_repair_of_a_remote_lake_leave_no_cache_folder(s3_server, s3_lake_url):
    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=D, storage_options=opts)) as lake:
        lake.add_splats(rows(50, 0))
        lake.add_splats(rows(50, 1))
    flags = [f"{k}={v}" for k, v in (("endpoint_url", s3_server.endpoint_url), ("key", "testing"),
                                     ("secret", "testing"), ("client_kwargs.region_name", "us-east-1"))]
    storage = [a for f in flags for a in ("--storage-option", f)]
    env = {k: v for k, v in os.environ.items() if k != "M2M_CACHE_DIR"}
    tmp = tempfile.gettempdir()
    before = {d for d in os.listdir(tmp) if d.startswith("m2m-cache-")}
    for args in (["rollback", s3_lake_url, "--to", "1"], ["repair", s3_lake_url], ["repair", s3_lake_url,
                                                                                    "--dry-run"]):
        r = subprocess.run([sys.executable, "-m", "m2m.cli.main", *args, *storage], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr
    # none left by these commands (another process's cache may come and go meanwhile: only new ones count)
    assert {d for d in os.listdir(tmp) if d.startswith("m2m-cache-")} - before == set()


def test_a_store_without_credentials_is_one_line_naming_the_object(s3_server, s3_lake_url):
    """botocore's NoCredentialsError went through as it was: a 100-line traceback in the CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([sys.executable, "-m", "m2m.cli.main", "info", s3_lake_url, "--storage-option",
                           f"endpoint_url={s3_server.endpoint_url}"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("m2m: error: list ") and "refused by the store" in proc.stderr, proc.stderr
    assert "NoCredentialsError" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_signed_lakes_cached_copy_changed_on_the_node_is_downloaded_again(s3_server, s3_lake_url, tmp_path):
    """A copy edited with its CRCs kept failed its SHA-256 at every later handle, though the object in
    the store was intact: it is now dropped and downloaded once more, as a CRC-damaged one is."""
    from tests.lake.test_cross_checks import _forge_keeping_crcs

    cache = tmp_path / "cache"
    opts = s3_server.storage_options
    labels = np.arange(100) % 5
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=16, storage_options=opts, lake_key="k",
                              cache_dir=str(cache))) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((100, 16)), labels=labels)
        entry = lk.manifest.shards[0].files[0]
    path = next(cache / f for f in os.listdir(cache) if f.endswith(".shard"))
    data = path.read_bytes()
    at = data.find(labels.astype(np.int64).tobytes())
    nan = data.find(np.full(100, np.nan, np.float32).tobytes())
    forged = _forge_keeping_crcs(data, at, np.int64(4).tobytes(),
                                 [(nan + 4 * i, b) for i in range(100) for b in range(2)], entry.block_bytes or len(data))
    path.write_bytes(forged)
    for _ in range(2):
        with open_lake(s3_lake_url, storage_options=opts, lake_key="k", cache_dir=str(cache)) as lk:
            assert int(lk[0]["label"]) == 0


def test_an_unclosed_remote_lake_leaves_no_cache_folder_at_exit_or_collection(s3_server, s3_lake_url, tmp_path):
    # the private cache was removed by close() only: every unclosed handle left a copy of each shard it
    # read in the temp dir (a probing user, 2026-12-07)
    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=D, storage_options=opts)) as lake:
        lake.add_splats(rows(100, 0))
    child = (f"import gc, os, tempfile\nfrom m2m import open_lake\nopts = {opts!r}\n"
             f"lake = open_lake({s3_lake_url!r}, storage_options=opts)\nlake[0]\n"
             "first = lake._fs.cache.dir\nassert os.listdir(first)\ndel lake\ngc.collect()\n"
             "assert not os.path.exists(first), os.listdir(first)\n"
             f"lake = open_lake({s3_lake_url!r}, storage_options=opts)\nlake[0]\n")   # left open at exit
    env = {k: v for k, v in os.environ.items() if k != "M2M_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_outliving_its_remote_lake_says_the_cache_went_with_close(s3_server, s3_lake_url, workers):
    from m2m.errors import LakeClosedError

    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=D, shard_bytes=SHARD, storage_options=opts)) as lake:
        lake.add_splats(rows(1000, 0))
    lake = open_lake(s3_lake_url, storage_options=opts)
    extra = dict(num_workers=2) if workers else dict(warm_bytes=0, hot_bytes=0)   # (in line: cold reads)
    dl = lake.export_to_dataloader(batch_size=100, shuffle=False, columns=("id",), **extra)
    next(iter(dl))
    lake.close()
    # the same type with workers or without (the prefetch thread wrapped it as StreamError)
    with pytest.raises(LakeClosedError, match="private shard cache is removed by lake.close"):
        for _ in dl:
            pass
    dl.close()
