"""The lake: append, reopen, pinned versions, Arrow readability, vacuum, remote (fsspec) lakes."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from m2m import (
    ConfigError,
    DimensionMismatchError,
    LakeNotFoundError,
    M2MConfig,
    create_m2m,
    open_lake,
)


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_add_returns_unique_stable_ids_and_normalises(lake_path, rng):
    x = rng.standard_normal((50, 16)) * 3
    with create_m2m(M2MConfig(path=lake_path, latent_dim=16)) as lake:
        ids = lake.add_splats(x)
        ids2 = lake.add_splats(x[:5])
        assert ids.dtype == np.int64 and len(set(ids) | set(ids2)) == 55
        assert len(lake) == 55 and lake.version == 2
    with open_lake(lake_path) as lake:
        s = lake.splats(ids)
        np.testing.assert_array_equal(s["id"], ids)
        np.testing.assert_allclose(s["mu"], unit(x), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(s["mu"], axis=1), 1.0, atol=1e-6)
        assert np.isnan(s["kappa"]).all() and (s["alpha"] == 1.0).all()
        ids3 = lake.add_splats(x[0])
        assert ids3[0] == 55


@pytest.mark.parametrize("make", [
    lambda a: torch.from_numpy(a), lambda a: torch.from_numpy(a).half(), lambda a: a.tolist(),
    lambda a: a.astype(np.float64), lambda a: torch.from_numpy(a).to(torch.bfloat16),
])
def test_accepts_numpy_torch_lists_any_float(make, rng):
    x = rng.standard_normal((7, 8)).astype(np.float32)
    with create_m2m(M2MConfig(latent_dim=8)) as lake:
        lake.add_splats(make(x))
        assert len(lake) == 7
        np.testing.assert_allclose(lake.splats()["mu"], unit(x), atol=1e-2)


def test_labels_kappa_alpha_metadata_ride_along(lake_path, rng):
    x = rng.standard_normal((6, 4))
    with create_m2m(M2MConfig(path=lake_path, latent_dim=4)) as lake:
        lake.add_splats(x, labels=np.array([3, 1, 3, 2, 1, 1]), kappa=np.arange(1, 7), alpha=np.full(6, 2.0),
                        metadata={"score": np.linspace(0, 1, 6), "src": np.array(list("abcdef"))})
    with open_lake(lake_path) as lake:
        s = lake.splats([0, 5])
        assert s["label"].tolist() == [3, 1]
        assert s["kappa"].tolist() == [1.0, 6.0] and s["alpha"].tolist() == [2.0, 2.0]
        assert s["src"].tolist() == ["a", "f"]
        info = lake.info()
        assert info["rows"] == 6 and info["alpha"]["total"] == 12.0 and info["kappa"]["max"] == 6.0


def test_string_labels_are_kept_and_coded(rng):
    with create_m2m(M2MConfig(latent_dim=4)) as lake:
        lake.add_splats(rng.standard_normal((4, 4)), labels=["cat", "dog", "cat", "eel"])
        lake.add_splats(rng.standard_normal((2, 4)), labels=["fox", "dog"])
        assert lake.splats()["label"].tolist() == ["cat", "dog", "cat", "eel", "fox", "dog"]
        snap = lake.snapshot
        codes = np.concatenate([snap.column(s, "label") for s in range(len(snap.manifest.shards))])
        assert codes.tolist() == [0, 1, 0, 2, 3, 1]


def test_schema_mismatch_on_append_is_rejected(rng):
    with create_m2m(M2MConfig(latent_dim=4)) as lake:
        lake.add_splats(rng.standard_normal((3, 4)), labels=[1, 2, 3])
        with pytest.raises(ValueError, match="labels"):
            lake.add_splats(rng.standard_normal((3, 4)))
        with pytest.raises(ValueError, match="metadata"):
            lake.add_splats(rng.standard_normal((1, 4)), labels=[1], metadata={"x": [1]})
        assert len(lake) == 3 and lake.version == 1


def test_shards_are_plain_arrow_ipc_files(lake_path, rng):
    x = rng.standard_normal((1000, 32))
    with create_m2m(M2MConfig(path=lake_path, latent_dim=32, shard_bytes=1 << 16)) as lake:
        lake.add_splats(x, labels=np.arange(1000) % 7)
        assert len(lake.manifest.shards) == 3
        rows = []
        for shard in lake.manifest.shards:
            with pa.memory_map(os.path.join(lake_path, shard.files[0].path)) as src:
                table = pa.ipc.open_file(src).read_all()
            assert table.schema.field("mu").type == pa.list_(pa.float32(), 32)
            rows.append(np.asarray(table.column("mu").combine_chunks().flatten()).reshape(-1, 32))
            assert table.column("id").to_pylist() == list(range(shard.id_min, shard.id_max + 1))
        np.testing.assert_allclose(np.concatenate(rows), unit(x), atol=1e-6)


def test_float16_storage(lake_path, rng):
    x = rng.standard_normal((100, 64))
    with create_m2m(M2MConfig(path=lake_path, latent_dim=64, storage_dtype="float16")) as lake:
        lake.add_splats(x)
        assert lake.snapshot.column(0, "mu").dtype == np.float16
        s = lake.splats()
        assert s["mu"].dtype == np.float32
        np.testing.assert_allclose(s["mu"], unit(x), atol=2e-3)


def test_gather_fills_an_out_array_across_shards(lake_path, rng):
    x = rng.standard_normal((6000, 16))
    with create_m2m(M2MConfig(path=lake_path, latent_dim=16, storage_dtype="float16", shard_bytes=1 << 16)) as lake:
        lake.add_splats(x)
        snap = lake.snapshot
        assert len(lake.manifest.shards) > 3
        rows = np.array([5999, 0, 3150, 7, 7, 4201])
        want = snap.gather("mu", rows)  # float16, as stored
        out = np.full((rows.size + 2, 16), np.nan, np.float32)
        assert snap.gather("mu", rows, out=out[1:-1]) is not None
        np.testing.assert_array_equal(out[1:-1], want.astype(np.float32))  # cast into the out dtype
        assert np.isnan(out[0]).all() and np.isnan(out[-1]).all()  # nothing written outside it
        with pytest.raises(ConfigError, match="out has 5 rows for 6 positions"):
            snap.gather("mu", rows, out=out[:5])


def test_readers_pin_their_version(lake_path, rng):
    with create_m2m(M2MConfig(path=lake_path, latent_dim=8)) as writer:
        writer.add_splats(rng.standard_normal((10, 8)))
        reader = open_lake(lake_path)
        writer.add_splats(rng.standard_normal((5, 8)))
        assert len(reader) == 10 and len(reader.splats()["id"]) == 10
        assert reader.refresh() == 2 and len(reader) == 15
        old = writer.checkout(1)
        assert old.num_rows == 10
        reader.close()


def test_reopen_with_other_dim_or_dtype_is_a_value_error(lake_path, rng):
    with create_m2m(M2MConfig(path=lake_path, latent_dim=8)) as lake:
        lake.add_splats(rng.standard_normal((2, 8)))
    with pytest.raises(ValueError, match="latent_dim 8"):
        create_m2m(M2MConfig(path=lake_path, latent_dim=16))
    with pytest.raises(DimensionMismatchError, match="float32"):
        create_m2m(M2MConfig(path=lake_path, latent_dim=8, storage_dtype="float16"))
    with open_lake(lake_path) as lake:
        with pytest.raises(ValueError, match="dimension 9"):
            lake.add_splats(np.ones((1, 9)))


def test_a_float16_lake_reopens_with_the_default_dtype_and_refuses_another_given(lake_path, rng):
    # observed: create_m2m(M2MConfig(path, latent_dim)) and open_lake(path, config=M2MConfig(...)) over a
    # float16 lake were refused ("the config asks for storage_dtype='float32'"), a dtype nobody asked for
    with create_m2m(M2MConfig(path=lake_path, latent_dim=8, storage_dtype="float16")) as lake:
        lake.add_splats(rng.standard_normal((2, 8)))
    for reopen in (lambda: create_m2m(M2MConfig(path=lake_path, latent_dim=8)),
                   lambda: open_lake(lake_path, config=M2MConfig(latent_dim=8, knn_k=4)),
                   lambda: create_m2m(dataclasses.replace(M2MConfig(latent_dim=8), path=lake_path))):
        with reopen() as lake:
            lake.add_splats(rng.standard_normal((2, 8)))
            assert lake.config.storage_dtype == "float16" and lake.to_arrow()["mu"].type.value_type == pa.float16()
    for given in (lambda: create_m2m(M2MConfig(path=lake_path, latent_dim=8, storage_dtype="float32")),
                  lambda: open_lake(lake_path, config=M2MConfig(latent_dim=8, storage_dtype="float32"))):
        with pytest.raises(DimensionMismatchError, match="stores float16, the config asks for storage_dtype='float32'"):
            given()
    with open_lake(lake_path) as lake:
        assert len(lake) == 8


def test_open_missing_lake(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        open_lake(tmp_path / "nope")
    assert isinstance(info.value, LakeNotFoundError)


def test_temporary_lake_is_deleted_on_close(rng):
    lake = create_m2m(M2MConfig(latent_dim=4))
    lake.add_splats(rng.standard_normal((3, 4)))
    path = lake.path
    assert os.path.isdir(path)
    lake.close()
    assert not os.path.exists(path)


def test_vacuum_keeps_last_versions_and_removes_orphans(lake_path, rng):
    with create_m2m(M2MConfig(path=lake_path, latent_dim=8)) as lake:
        for _ in range(4):
            lake.add_splats(rng.standard_normal((5, 8)))
        orphan = os.path.join(lake_path, "_data", "deadbeef" * 4 + ".arrow")
        open(orphan, "wb").write(b"x")
        result = lake.vacuum(keep=2)
        assert result["versions_removed"] == 3 and not os.path.exists(orphan)
        assert lake.versions() == [3, 4]
        assert len(lake.splats()["id"]) == 20 and lake.verify() == []


def test_local_vacuum_keeps_unreferenced_files_younger_than_min_age(lake_path, rng):
    # observed: vacuum(min_age_s=3600) on a local lake removed a file written a second before (a
    # compaction in another process writes its files before taking the lock to publish them)
    with create_m2m(M2MConfig(path=lake_path, latent_dim=8)) as lake:
        for _ in range(3):
            lake.add_splats(rng.standard_normal((5, 8)))
        young = os.path.join(lake_path, "_data", "ab" * 16 + ".arrow")
        old = os.path.join(lake_path, "_data", "cd" * 16 + ".arrow")
        for p in (young, old):
            open(p, "wb").write(b"x")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        assert lake.vacuum(keep=1, min_age_s=3600) == {"versions_removed": 3, "files_removed": 1}
        assert os.path.exists(young) and not os.path.exists(old)
        assert lake.vacuum(keep=1) == {"versions_removed": 0, "files_removed": 1}  # local default 0
        assert not os.path.exists(young) and len(lake) == 15 and lake.verify() == []
        for bad in (-1, float("nan"), float("inf"), "60", True):
            with pytest.raises(ConfigError, match="min_age_s must be a finite number"):
                lake.vacuum(min_age_s=bad)


def test_chunked_write_of_a_memmap(tmp_path, rng):
    src = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(5000, 16))
    src[:] = rng.standard_normal((5000, 16))
    src.flush()
    mm = np.load(tmp_path / "big.npy", mmap_mode="r")
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=16, shard_bytes=1 << 16)) as lake:
        lake.add_splats(mm)
        assert len(lake.manifest.shards) == int(np.ceil(5000 / (65536 // (16 * 4 + 32))))
        np.testing.assert_allclose(lake.splats()["mu"], unit(mm), atol=1e-6)


def test_fsspec_memory_lake_roundtrip(rng):
    url = f"memory://m2m-test-{rng.integers(1 << 30)}"
    x = rng.standard_normal((40, 8))
    with create_m2m(M2MConfig(path=url, latent_dim=8, shard_bytes=1 << 16)) as lake:
        lake.add_splats(x, labels=np.arange(40) % 3)
        assert lake.verify() == []
    with open_lake(url) as lake:
        assert len(lake) == 40
        np.testing.assert_allclose(lake.splats()["mu"], unit(x), atol=1e-6)
