"""Compaction: small shards (and sidecars) merged in one commit, ids/order/values kept, safe with
readers pinned to older versions and with writers committing while it runs."""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
import pytest
from click.testing import CliRunner

import m2m.lake.compact as compact_mod
from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import ConfigError, CorruptShardError
from m2m.lake.compact import plan_runs
from m2m.lake.manifest import FileEntry, Manifest, ShardEntry

DIM = 16


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def fill(lake, appends: int, n: int = 40, seed: int = 0) -> np.ndarray:
    ids = np.zeros(0, np.int64)
    for i in range(appends):
        ids = lake.add_splats(rows(n, seed + i), labels=[f"c{j % 3}" for j in range(n)],
                        metadata={"src": np.arange(n) + 1000 * i, "name": np.array([f"r{i}-{j}" for j in range(n)],
                                                                                     dtype=object)})
    return ids


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == object:
            assert list(a[k]) == list(b[k]), k
        else:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def full(lake) -> dict:
    """Every column as the reader returns it, neighbours included (a lake handle or a snapshot)."""
    snap = getattr(lake, "snapshot", lake)
    out = {name: snap.read_all(name) for name in snap.column_names if name not in ("neighbors", "neighbor_cos")}
    for name in ("neighbors", "neighbor_cos"):  # the rows of the shards that have a geometry sidecar
        if name in snap.column_names:
            out[name] = np.concatenate([snap.column(s, name) for s, e in enumerate(snap.manifest.shards)
                                        if any(name in f.columns for f in e.files)])
    return out | {"ids": snap.ids()}


def test_compaction_keeps_ids_order_values_and_sidecars(tmp_path):
    cfg = M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM, storage_dtype="float16", knn_k=4)
    with create_m2m(cfg) as lake:
        fill(lake, 12)
        lake.estimate_kappa()                 # every shard gets a geometry sidecar
        fill(lake, 5, seed=100)               # shards without sidecars
        before, v_before = full(lake), lake.version
        old_files = {f.path for f in lake.manifest.files()}
        report = lake.compact()
        assert report.version == lake.version == v_before + 1
        assert report.shards_before == 17 and report.shards_after == 2   # sidecar layout splits the runs
        assert report.shards_merged == 17 and report.rows_rewritten == len(lake) == 17 * 40
        assert lake.manifest.operation["type"] == "compact"
        same(before, full(lake))
        assert lake.verify() == []
        s0 = lake.manifest.shards[0]
        assert [f.columns for f in s0.files] == [("id", "mu", "kappa", "alpha", "mu_norm", "label", "src", "name"),
                                                 ("id", "kappa", "neighbors", "neighbor_cos", "neighbor_kappa",
                                                  "neighbor_alpha", "neighbor_same_label")]
        assert lake.manifest.geometry["rows"] == 12 * 40
        old_snap = lake.checkout(v_before)
        for name in ("neighbor_kappa", "neighbor_alpha", "neighbor_same_label"):   # the terms move with their rows
            assert np.array_equal(lake.snapshot.column(0, name), np.concatenate(
                [old_snap.column(s, name) for s in range(12)]), equal_nan=True)
        # the old version and its files are untouched until vacuum
        assert old_files <= set(f"_data/{n}" for n in os.listdir(tmp_path / "lake" / "_data"))
        same(before, full(lake.checkout(v_before)))
        assert lake.compact().version is None   # nothing left to merge
        lake.vacuum(keep=1)
        assert not old_files & set(f"_data/{n}" for n in os.listdir(tmp_path / "lake" / "_data"))
    with open_lake(cfg.path) as lake:
        same(before, full(lake))


def test_plan_runs_small_big_layout_target_and_barriers():
    def shard(i: int, size: int, cols=("id", "mu", "kappa", "alpha")) -> ShardEntry:
        return ShardEntry(10, 10 * i, 10 * i + 9, (FileEntry(f"_data/s{i}", size, 0, cols),))

    target = 1000
    x = ("id", "mu", "kappa", "alpha", "x")
    m = Manifest(version=1, dim=2, dtype="float32", next_id=200, shards=(
        shard(0, 100), shard(1, 100), shard(2, 900), shard(3, 100), shard(4, 300), shard(5, 300),
        shard(6, 300), shard(7, 100), shard(8, 100, x), shard(9, 100, x)))
    # 2 is big (>= half the target) and stands alone; 3..6 fill the target; 8 and 9 have another layout
    assert plan_runs(m, target) == [(0, 2), (3, 7), (8, 10)]
    # an id reserved by an uncommitted append between shards 3 and 4 splits the run there
    assert plan_runs(m, target, barriers=[40]) == [(0, 2), (4, 8), (8, 10)]
    assert plan_runs(m, 64) == []


def test_target_bytes_checked(tmp_path):
    with create_m2m(M2MConfig(latent_dim=DIM)) as lake:
        fill(lake, 2)
        for bad in (0, 1000, 1.5, True, "1MB"):
            with pytest.raises(ConfigError, match="target_bytes"):
                lake.compact(target_bytes=bad)


def test_a_stream_keeps_reading_its_version_through_compactions(tmp_path):
    cfg = M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM, prefetch=0)
    with create_m2m(cfg) as lake:
        fill(lake, 10)
        want = {int(i): v for i, v in zip(lake.snapshot.ids(), lake.snapshot.read_all("mu"))}
        dl = lake.export_to_dataloader(batch_size=16, columns=("id", "embedding"), shuffle=True, seed=3)
        seen: list[int] = []
        it = iter(dl)
        for _ in range(5):
            b = next(it)
            seen += b["id"].tolist()
        with open_lake(cfg.path) as other:   # another handle (another process would do the same)
            assert other.compact().shards_after == 1
            fill(other, 1, n=7, seed=99)
        lake.compact()                      # and this handle moves on to a new version
        for b in it:
            seen += b["id"].tolist()
            for i, e in zip(b["id"].tolist(), b["embedding"].numpy()):
                assert np.array_equal(want[i], e)
        assert sorted(seen) == sorted(want)   # each row of the pinned version exactly once


def test_a_stream_whose_version_a_vacuum_deleted_says_so_in_one_line(tmp_path):
    # compaction keeps the old files for pinned readers; a vacuum then deletes them: a reader that still
    # needs one raises naming the file and the likely cause, not a bare "missing" that reads as damage
    cfg = M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM, prefetch=0)
    with create_m2m(cfg) as lake:
        fill(lake, 10)
        dl = lake.export_to_dataloader(batch_size=16, columns=("id",), shuffle=False)
        it = iter(dl)
        next(it)
        lake.compact()
        assert lake.vacuum(keep=1)["files_removed"] > 0
        with pytest.raises(CorruptShardError) as info:
            list(it)
        msg = str(info.value)
        assert "is missing" in msg and "vacuum" in msg and "\n" not in msg
        dl.close()
        assert len(list(lake.export_to_dataloader(batch_size=16, columns=("id",)))) > 0   # a new loader reads


def test_append_landing_during_compaction_is_kept(tmp_path, monkeypatch):
    cfg = M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM)
    with create_m2m(cfg) as lake:
        fill(lake, 8)
        added = []

        def append_meanwhile() -> None:
            with open_lake(cfg.path) as other:
                added.append(fill(other, 1, n=5, seed=7))

        monkeypatch.setattr(compact_mod, "compact", functools.partial(compact_mod.compact, after_write=append_meanwhile))
        before = full(lake)
        report = lake.compact()
        assert report.version == lake.version and report.runs_dropped == 0
        assert len(lake) == 8 * 40 + 5 and len(lake.manifest.shards) == 2
        # the head it committed onto had 9 shards (the append's one): "8 -> 2" read as if the append were merged
        assert (report.shards_before, report.shards_after, report.shards_merged) == (9, 2, 8)
        assert np.array_equal(lake.snapshot.ids()[-5:], added[0])
        after = full(lake)
        same(before, {k: v[: 8 * 40] for k, v in after.items()})
        assert lake.verify() == []


def test_compaction_that_loses_to_a_rewrite_plans_again(tmp_path, monkeypatch):
    cfg = M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM, knn_k=4)
    with create_m2m(cfg) as lake:
        fill(lake, 6)
        calls = []

        def estimate_meanwhile() -> None:
            if not calls:
                with open_lake(cfg.path, knn_k=4) as other:
                    other.estimate_kappa()   # new sidecars on every shard: the planned runs are stale
            calls.append(1)

        monkeypatch.setattr(compact_mod, "compact",
                            functools.partial(compact_mod.compact, after_write=estimate_meanwhile))
        n_files = len(os.listdir(tmp_path / "lake" / "_data"))
        report = lake.compact()
        assert len(calls) == 2 and report.runs_dropped == 1 and report.version == lake.version
        assert lake.manifest.geometry is not None and len(lake.manifest.shards) == 1
        assert len(lake.manifest.shards[0].files) == 2 and lake.verify() == []
        # the dropped attempt's files are gone: 6 main + 6 sidecars + the 2 merged files
        assert len(os.listdir(tmp_path / "lake" / "_data")) == n_files + 6 + 2


def test_compaction_with_appends_racing_in_a_thread(tmp_path):
    cfg = M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM)
    os.environ.setdefault("M2M_LOCK_TIMEOUT", "0")
    with create_m2m(cfg) as lake:
        fill(lake, 20, n=20)
        errors: list[BaseException] = []
        added: list[np.ndarray] = []

        def appender() -> None:
            try:
                with open_lake(cfg.path) as other:
                    for i in range(10):
                        while True:
                            try:
                                added.append(fill(other, 1, n=3, seed=500 + i))
                                break
                            except RuntimeError:   # the lock is busy for a moment: try again
                                continue
            except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
                errors.append(exc)

        t = threading.Thread(target=appender)
        t.start()
        reports = [lake.compact()]
        t.join(60)
        assert not errors and not t.is_alive()
        lake.refresh()
        reports.append(lake.compact())
        ids = lake.snapshot.ids()
        assert len(ids) == 20 * 20 + 30 and len(set(ids.tolist())) == len(ids)
        assert set(np.concatenate(added).tolist()) <= set(ids.tolist())
        assert lake.verify() == []


def test_auto_compact(tmp_path):
    cfg = M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM, auto_compact=4)
    with create_m2m(cfg) as lake:
        fill(lake, 3)
        assert len(lake.manifest.shards) == 3
        fill(lake, 1, seed=9)
        assert len(lake.manifest.shards) == 1 and lake.manifest.operation["type"] == "compact"
        assert len(lake) == 160 and lake.verify() == []
    with pytest.raises(ConfigError, match="auto_compact"):
        M2MConfig(auto_compact=1)


def test_corrupt_input_shard_stops_compaction_before_anything_is_published(tmp_path):
    cfg = M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM)
    with create_m2m(cfg) as lake:
        fill(lake, 4)
        path = tmp_path / "lake" / lake.manifest.shards[2].files[0].path
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        files = set(os.listdir(tmp_path / "lake" / "_data"))
        version = lake.version
        with pytest.raises(CorruptShardError):
            lake.compact()
        assert lake.version == version and set(os.listdir(tmp_path / "lake" / "_data")) == files


def test_cli_compact(tmp_path):
    from m2m.cli.main import cli

    path = str(tmp_path / "lake")
    with create_m2m(M2MConfig(path=path, latent_dim=DIM)) as lake:
        fill(lake, 5)
    result = CliRunner().invoke(cli, ["compact", path, "--target", "1MB", "-q"])
    assert result.exit_code == 0, result.output
    assert "5 -> 1 shards" in result.output
    result = CliRunner().invoke(cli, ["compact", path, "-q"])
    assert result.exit_code == 0 and "nothing to compact" in result.output
    with open_lake(path) as lake:
        assert len(lake.manifest.shards) == 1 and lake.verify() == []


def test_two_compactions_racing_publish_once(tmp_path, monkeypatch):
    cfg = M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM)
    with create_m2m(cfg) as lake:
        fill(lake, 6)
        before = full(lake)
        real = compact_mod.compact
        inner: list = []

        def other_compacts() -> None:
            if not inner:
                inner.append(None)
                with open_lake(cfg.path) as other:
                    inner[0] = real(other._fs, lambda build: compact_mod.publish_local(other._fs, build),
                                    cfg.shard_bytes)

        monkeypatch.setattr(compact_mod, "compact", functools.partial(real, after_write=other_compacts))
        report = lake.compact()
        assert inner[0].version == 7 and inner[0].shards_after == 1
        assert report.version is None and report.runs_dropped == 1   # lost, planned again: nothing left
        lake.refresh()
        same(before, full(lake))
        assert len(lake.manifest.shards) == 1 and lake.verify() == []
        live = {f.path.split("/")[1] for f in lake.manifest.files()} | {
            f.path.split("/")[1] for v in lake.versions() for f in lake.checkout(v).manifest.files()}
        assert set(os.listdir(tmp_path / "lake" / "_data")) == live   # the loser's files are gone
