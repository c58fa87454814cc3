"""Full-shuffle epochs over a remote lake with a node cache of 2.5 shards: the warm arena's fill thread
and the stream's gathers read shard files the cache keeps evicting. Every epoch must be exact; a
file evicted between two threads' uses must be downloaded again, never reported missing."""

from __future__ import annotations

import time

import numpy as np
import pytest

import m2m

from .helpers import make_lake


def _stress(url: str, cache_dir: str, budget: int, seconds: float, workers: int = 0) -> int:
    epochs = 0
    deadline = time.monotonic() + seconds
    with m2m.open_lake(url, cache_dir=cache_dir, cache_bytes=budget) as lake:
        n = lake.snapshot.num_rows
        while time.monotonic() < deadline or epochs == 0:
            dl = lake.export_to_dataloader(batch_size=64, columns=("embedding", "id"), shuffle_mode="full",
                                           epoch=epochs, num_workers=workers, timeout=120 if workers else 0)
            ids = np.concatenate([b["id"].numpy() for b in dl])
            assert len(ids) == n and len(np.unique(ids)) == n, epochs
            epochs += 1
    return epochs


def _lake(s3_bucket: str) -> tuple[str, int]:
    url = f"{s3_bucket}/lake"
    files = make_lake(url, 4000)
    return url, max(b for _, b, _ in files)


def test_full_shuffle_epochs_with_a_small_cache_never_miss_a_file(s3_bucket, tmp_path) -> None:
    url, shard = _lake(s3_bucket)
    epochs = _stress(url, str(tmp_path / "cache"), int(2.5 * shard), seconds=8.0)
    print(f"{epochs} full-shuffle epochs, exact")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_full_shuffle_stress_with_a_small_cache(s3_bucket, tmp_path, workers) -> None:
    url, shard = _lake(s3_bucket)
    epochs = _stress(url, str(tmp_path / "cache"), int(2.5 * shard), seconds=60.0, workers=workers)
    print(f"{epochs} full-shuffle epochs with {workers} workers, exact")


def test_a_shard_evicted_while_two_threads_open_it_is_downloaded_again(s3_bucket, tmp_path, monkeypatch) -> None:
    """The race behind a false "shard file <cache>/<hash>.shard is missing": one thread (the warm
    fill) opens a shard whose cached copy was just evicted, while another (a gather) reads it."""
    import threading

    from m2m.stream.stages.cold import ColdReader

    from .helpers import unit_rows

    url, shard = _lake(s3_bucket)
    with m2m.open_lake(url, cache_dir=str(tmp_path / "cache"), cache_bytes=100 * shard) as lake:
        snap = lake.snapshot
        fs = snap.fs
        plain_extent = snap.column_extent

        def extent_then_evicted(s: int, name: str):
            ext = plain_extent(s, name)
            if ext is not None:
                fs.cache.discard(ext.entry.path)  # evicted right after its metadata was read
            return ext

        plain_get = fs.cache._get

        def slow_get(rel: str, local: str) -> None:
            time.sleep(0.3)
            plain_get(rel, local)

        monkeypatch.setattr(snap, "column_extent", extent_then_evicted)
        monkeypatch.setattr(fs.cache, "_get", slow_get)
        reader = ColdReader(snap, ["mu"])
        lo, hi = int(reader.offsets[0]), int(reader.offsets[1])
        want = unit_rows(4000)[lo:hi]
        errors: list[BaseException] = []
        outs = [np.empty_like(want) for _ in range(2)]

        def read(i: int) -> None:
            try:
                reader.read_rows("mu", lo, hi, outs[i])
            except BaseException as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
        threads[0].start()
        time.sleep(0.45)  # the first thread is re-downloading the evicted copy now
        threads[1].start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert all(np.allclose(o, want, atol=1e-6) for o in outs)  # (stored renormalised: within float32 ulps)
        # closed, evicted, read again: reopened through the cache (downloaded), never by its old path
        reader.close()
        fs.cache.discard(snap.manifest.shards[0].files[0].path)
        reader.read_rows("mu", lo, hi, outs[0])
        assert np.allclose(outs[0], want, atol=1e-6)
