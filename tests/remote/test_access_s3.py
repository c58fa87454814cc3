"""Random access (``lake[i]``, ``lake.take(ids)``) on a remote lake whose node cache is smaller than
the lake: rows read through cached copies the cache then evicts must still read, bit-exact, and the
disk in use stays within the budget plus one shard (the stream's bound)."""

from __future__ import annotations

import numpy as np
import pytest

import m2m

from .helpers import DiskWatch, aws_env, make_lake, unit_rows


@pytest.fixture(scope="module")
def small_cache_lake(s3_server) -> tuple[str, int]:
    with aws_env(s3_server.endpoint_url):
        url = f"{s3_server.bucket()}/lake"
        files = make_lake(url, 4000)
    return url, max(b for _, b, _ in files)


def test_take_after_the_cache_evicted_the_files_it_read(s3_env, small_cache_lake, tmp_path) -> None:
    url, shard = small_cache_lake
    x = unit_rows(4000)
    ids = np.random.default_rng(1).permutation(4000)[:300]
    with m2m.open_lake(url, cache_dir=str(tmp_path / "c"), cache_bytes=int(2.5 * shard)) as lake:
        assert len(lake.manifest.shards) >= 6
        for _ in range(2):  # the second round reads shards whose first copies were evicted
            got = lake.take(ids)
            assert np.array_equal(got["id"], ids)
            assert np.array_equal(got["mu"], x[ids])
        for i in (0, 3999, 17, 2500, 0):
            assert np.array_equal(lake[i]["mu"], x[i])
        assert lake.snapshot.fetch_stats()["evictions"] > 0


def test_take_after_a_stream_evicted_its_files(s3_env, small_cache_lake, tmp_path) -> None:
    url, shard = small_cache_lake
    x = unit_rows(4000)
    with m2m.open_lake(url, cache_dir=str(tmp_path / "c"), cache_bytes=int(2.5 * shard)) as lake:
        dl = lake.export_to_dataloader(batch_size=256, columns=("embedding", "id"), shuffle_mode="full")
        seen = np.concatenate([b["id"].numpy() for b in dl])
        assert np.array_equal(np.sort(seen), np.arange(4000))
        got = lake.take(np.arange(0, 4000, 97))  # extents known from the stream, copies evicted since
        assert np.array_equal(got["mu"], x[::97])


def test_random_access_holds_disk_to_the_budget_plus_one_shard(s3_env, small_cache_lake, tmp_path) -> None:
    url, shard = small_cache_lake
    budget = int(2.5 * shard)
    cache_dir = str(tmp_path / "c")
    rng = np.random.default_rng(2)
    with m2m.open_lake(url, cache_dir=cache_dir, cache_bytes=budget) as lake:
        with DiskWatch(cache_dir) as watch:
            for _ in range(30):
                lake.take(rng.integers(0, 4000, 5))
    assert watch.peak <= budget + shard + 8 * 4096, (watch.peak, budget, shard)


def test_an_object_missing_from_the_bucket_is_named_in_one_line(s3_env, s3_lake_url, tmp_path) -> None:
    # observed: a bare FileNotFoundError "The specified key does not exist." naming no object (take,
    # lake[i], streams, m2m verify)
    import s3fs

    from m2m.errors import PathNotFoundError

    files = make_lake(s3_lake_url, 1500)
    gone = f"{s3_lake_url}/{files[1][0]}"
    s3fs.S3FileSystem(anon=False).rm(gone)
    with m2m.open_lake(s3_lake_url, cache_dir=str(tmp_path / "c")) as lake:
        for call in (lambda: lake.take(np.arange(1500)), lambda: list(lake.export_to_dataloader(batch_size=256))):
            with pytest.raises(PathNotFoundError, match=f"(download|size) {gone}: no such object .*reopen the lake") as info:
                call()
            assert "\n" not in str(info.value)


def test_a_corrupt_head_of_a_remote_lake_names_its_url_in_the_recovery_commands(s3_env, s3_lake_url) -> None:
    # observed: "m2m rollback <bucket>/lake --to 1" without the s3:// scheme: the command it suggests
    # looked for a local folder
    import s3fs

    from m2m.errors import CorruptShardError

    make_lake(s3_lake_url, 100)
    with m2m.open_lake(s3_lake_url) as lake:
        lake.add_splats(unit_rows(10, seed=3))
        head = f"{s3_lake_url}/_manifests/v{lake.version:010d}.json"
    s3fs.S3FileSystem(anon=False).pipe_file(head, b"{not json")
    with pytest.raises(CorruptShardError, match=f"`m2m rollback {s3_lake_url} --to 1`.*`m2m repair {s3_lake_url}`"):
        m2m.open_lake(s3_lake_url)
