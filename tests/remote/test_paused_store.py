"""A paused object store (SIGSTOP: connections accepted, never answered) mid-epoch ends in a one-line
error within 16 s at the default io_timeout/io_retries
(one timeout, not one per download queued behind it)."""

from __future__ import annotations

import time

import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import ObjectStoreError

from .helpers import DIM, SHARD_BYTES, unit_rows

PAUSED_ERROR_S = 16.0  # one io_timeout and slack: the code before waited for 2-3 io_timeouts in a row (CI: 30.4 s)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_store_paused_mid_epoch_ends_in_one_line_within_one_timeout(s3_server_private, tmp_path, workers) -> None:
    srv = s3_server_private
    url = f"{srv.bucket()}/lake"
    cfg = M2MConfig(path=url, latent_dim=DIM, shard_bytes=SHARD_BYTES, storage_options=srv.storage_options,
                    cache_dir=str(tmp_path / "writer-cache"))
    with create_m2m(cfg) as lake:
        lake.add_splats(unit_rows(40000))
        shard = max(f.bytes for s in lake.manifest.shards for f in s.files)
        assert len(lake.manifest.shards) >= 60
    # a cache of 3 shards: the epoch keeps downloading as it goes
    with open_lake(url, storage_options=srv.storage_options, cache_dir=str(tmp_path / "cache"),
                   cache_bytes=3 * shard) as lake:
        dl = lake.export_to_dataloader(batch_size=100, shuffle_mode="block", block_rows=100,
                                       num_workers=workers, warm_bytes=1 << 16)
        it = iter(dl)
        for _ in range(2):
            next(it)
        srv.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(ObjectStoreError) as info:  # the same type whichever thread met it
                for _ in it:
                    pass
            elapsed = time.monotonic() - t0
        finally:
            srv.resume()
        del it
    text = str(info.value)
    print(f"paused mid-epoch ({workers} workers): {type(info.value).__name__} after {elapsed:.1f} s: {text}")
    assert elapsed < PAUSED_ERROR_S
    assert "_data/" in text and "io_timeout=10" in text and url in text
    assert "\n" not in text.strip()  # a worker's error too (torch's message holds its traceback: unwrapped)


@pytest.mark.timeout(120)  # the code before waited for the store to come back
@pytest.mark.parametrize("where", ["_manifests/", "_data/"])
def test_a_store_paused_during_a_write_ends_it_in_one_line_and_loses_nothing(s3_server_private, monkeypatch,
                                                                             where) -> None:
    # observed: an upload to a SIGSTOPped store was not bounded by io_timeout (s3fs bounds a GET by its
    # read timeout, not a PUT): add_splats waited until the store came back, 60 s and more
    from m2m.errors import ObjectStoreError

    srv = s3_server_private
    url = f"{srv.bucket()}/lake"
    with create_m2m(M2MConfig(path=url, latent_dim=DIM, shard_bytes=SHARD_BYTES,
                              storage_options=srv.storage_options)) as lake:
        lake.add_splats(unit_rows(500))
    lake = open_lake(url, storage_options=srv.storage_options, io_timeout=2)
    fs = lake._fs
    real = fs.create_exclusive if where == "_manifests/" else fs.write_file

    def paused(rel, *args, **kwargs):  # the store stops answering right before this write
        if rel.startswith(where):
            srv.pause()
        return real(rel, *args, **kwargs)

    monkeypatch.setattr(fs, "create_exclusive" if where == "_manifests/" else "write_file", paused)
    try:
        t0 = time.monotonic()
        # which timeout names it depends on whether the request needed a new connection (a loaded machine:
        # the list before the manifest's write, ConnectTimeoutError), not on m2m
        timeouts = "(FSTimeoutError|ConnectTimeoutError|ReadTimeoutError)"
        with pytest.raises(ObjectStoreError, match=f"{where.rstrip('/')}.*{timeouts}") as info:
            lake.add_splats(unit_rows(800, seed=1))
        elapsed = time.monotonic() - t0
    finally:
        srv.resume()
        monkeypatch.undo()
        lake.close()
    assert elapsed < 3 * 2 + 2, elapsed  # the write's bound, plus one cleanup request's
    assert "\n" not in str(info.value)
    with open_lake(url, storage_options=srv.storage_options) as again:  # whatever landed is whole
        assert len(again) in (500, 1300) and again.verify() == []
        assert again.take(again.splats()["id"])["mu"].shape == (len(again), DIM)
