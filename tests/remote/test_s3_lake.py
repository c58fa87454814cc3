"""Lakes on a real S3 API server (moto, 127.0.0.1): storage options, many writers, network faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import M2MError, ObjectStoreError

WRITER = str(Path(__file__).with_name("_writer.py"))


def _rows(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _assert_consistent(lake) -> dict[str, np.ndarray]:
    s = lake.splats()
    ids = s["id"]
    assert len(np.unique(ids)) == len(ids) == len(lake)
    assert np.all(np.diff(ids) > 0)  # ascending in position order
    return s


def test_storage_options_reach_the_store_and_lakes_round_trip(s3_server, s3_lake_url) -> None:
    opts = s3_server.storage_options
    x = _rows(300, 16, 0)
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=16, storage_options=opts)) as lake:
        ids = lake.add_splats(x[:200])
        ids2 = lake.add_splats(x[200:])
        assert lake.version == 2
    assert ids.tolist() == list(range(200)) and ids2.tolist() == list(range(200, 300))
    assert "secret" not in repr(M2MConfig(storage_options=opts))  # credentials stay out of logs
    with open_lake(s3_lake_url, storage_options=opts) as lake:
        assert len(lake) == 300 and lake.version == 2
        mu = lake.splats()["mu"]
        np.testing.assert_allclose(mu, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
        assert sum(len(b) for b in lake.export_to_dataloader(batch_size=64)) == 300
        import pickle

        copy = pickle.loads(pickle.dumps(lake._fs))  # what a spawned DataLoader worker gets
        assert copy.fs.retries == 1 and copy.listdir("_manifests") == lake._fs.listdir("_manifests")
    with open_lake(s3_lake_url, version=1, storage_options=opts) as old:
        assert len(old) == 200 and old.version == 1


def test_a_commit_that_lost_the_race_is_rebased_not_lost(s3_server, s3_lake_url) -> None:
    """Writer A reserves ids and writes its shards; B commits meanwhile; A's manifest is rebased."""
    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, storage_options=opts)) as a, \
            open_lake(s3_lake_url, storage_options=opts) as b:
        a.add_splats(_rows(10, 8, 0))
        b.refresh()
        b_ids: list[np.ndarray] = []

        def b_commits_while_a_writes(_: int) -> None:
            if not b_ids:
                b_ids.append(b.add_splats(_rows(5, 8, 2), alpha=np.full(5, 2.0)))

        a_ids = a.add_splats(_rows(20, 8, 1), alpha=np.full(20, 3.0), progress=b_commits_while_a_writes)
        assert b.version == 2 and a.version == 3  # distinct versions, none overwritten
        assert a_ids.tolist() == list(range(10, 30))  # reserved before B's commit
        assert b_ids[0].tolist() == list(range(30, 35))
        s = _assert_consistent(a)
        assert len(a) == 35
        alpha_of = dict(zip(s["id"].tolist(), s["alpha"].tolist()))
        assert all(alpha_of[i] == 3.0 for i in a_ids) and all(alpha_of[i] == 2.0 for i in b_ids[0])
        assert a.versions() == [0, 1, 2, 3]


def test_consolidate_on_a_moved_head_is_rebuilt_on_the_new_head(s3_server, s3_lake_url) -> None:
    opts = s3_server.storage_options
    x = _rows(50, 8, 0)
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, storage_options=opts)) as a, \
            open_lake(s3_lake_url, storage_options=opts) as b:
        a.add_splats(np.concatenate([x, x]))  # every row twice
        b.refresh()
        done: list[bool] = []

        def append_meanwhile(_: int) -> None:
            if not done:
                done.append(True)
                b.add_splats(_rows(7, 8, 5))

        report = a.consolidate(0.999, progress=append_meanwhile)
        assert done and a.version == 3
        assert report.rows_before == 107 and report.rows_after == 57  # the rebuilt run saw B's rows
        _assert_consistent(a)


def test_failed_append_leaves_no_objects_behind(s3_server, s3_lake_url) -> None:
    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, shard_bytes=1 << 16, storage_options=opts)) as lake:
        lake.add_splats(_rows(10, 8, 0))
        before = set(lake._fs.listdir("_data"))

        def boom(n: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            lake.add_splats(_rows(3000, 8, 1), progress=boom)
        assert set(lake._fs.listdir("_data")) == before
        assert lake.refresh() == 1 and len(lake) == 10


def _run_writers(url: str, options: dict, writers: int, calls: int, rows: int, timeout: float) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parents[2] / "src"),
                                                                  os.environ.get("PYTHONPATH", "")) if p))
    procs = [subprocess.Popen([sys.executable, WRITER, url, json.dumps(options), str(w), str(calls), str(rows)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for w in range(writers)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err.decode()[-3000:]
            results += [json.loads(line) for line in out.decode().splitlines()]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    return results


def _check_writers(url: str, options: dict, results: list[dict], writers: int, calls: int, rows: int) -> None:
    assert len(results) == writers * calls
    rebased = sum(max(r["rebased"] for r in results if r["writer"] == w) for w in range(writers))
    print(f"{writers} writers x {calls} appends: {rebased} commits rebased after losing a race")
    versions = [r["version"] for r in results]
    assert len(set(versions)) == len(versions), "two commits reported the same version"
    reported = np.concatenate([r["ids"] for r in results])
    assert len(np.unique(reported)) == len(reported), "an id was given twice"
    with open_lake(url, storage_options=options) as lake:
        assert len(lake) == writers * calls * rows, "rows were lost or duplicated"
        assert lake.version == writers * calls
        s = _assert_consistent(lake)
        assert set(s["id"].tolist()) == set(reported.tolist())
        alpha_of = dict(zip(s["id"].tolist(), s["alpha"].tolist()))
        for r in results:  # every call's ids hold exactly that call's rows, in order
            expect = r["writer"] * 10_000 + r["call"] * 100 + np.arange(rows) + 1
            assert [alpha_of[i] for i in r["ids"]] == expect.astype(np.float32).tolist()
        assert not lake.verify()
        referenced = {f.path.rsplit("/", 1)[-1] for f in lake.manifest.files()}
        assert set(lake._fs.listdir("_data")) == referenced, "a commit left unreferenced objects"


def test_two_writer_processes_append_to_one_s3_lake(s3_server, s3_lake_url) -> None:
    opts = s3_server.storage_options
    create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, storage_options=opts)).close()
    results = _run_writers(s3_lake_url, opts, writers=2, calls=4, rows=20, timeout=240)
    _check_writers(s3_lake_url, opts, results, 2, 4, 20)


@pytest.mark.slow
def test_four_writer_processes_append_to_one_s3_lake(s3_server, s3_lake_url) -> None:
    opts = s3_server.storage_options
    create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, storage_options=opts)).close()
    results = _run_writers(s3_lake_url, opts, writers=4, calls=8, rows=25, timeout=480)
    _check_writers(s3_lake_url, opts, results, 4, 8, 25)


# ---------------------------------------------------------------------------------------------- faults
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    return subprocess.run([sys.executable, "-m", "m2m.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def _option_args(options: dict) -> list[str]:
    out = []
    for k, v in options.items():
        out += ["--storage-option", f"{k}={json.dumps(v) if isinstance(v, dict) else v}"]
    return out


def test_cli_takes_storage_options_and_fails_in_one_line_on_a_dead_endpoint(s3_server_private) -> None:
    srv = s3_server_private
    url = srv.lake_url()
    with create_m2m(M2MConfig(path=url, latent_dim=8, storage_options=srv.storage_options)) as lake:
        lake.add_splats(_rows(40, 8, 0))
    ok = _cli("info", url, *_option_args(srv.storage_options))
    assert ok.returncode == 0, ok.stderr
    assert "40" in ok.stdout
    srv.stop()
    t0 = time.monotonic()
    dead = _cli("info", url, *_option_args(srv.storage_options))
    elapsed = time.monotonic() - t0
    assert dead.returncode == 1
    lines = dead.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m2m: error:"), dead.stderr
    assert url.split("://")[1].split("/")[0] in lines[0]  # names the bucket/object
    assert elapsed < 60  # refused connections: io_retries=3 backoffs (< 5 s) + interpreter start


def _fault_lake(srv, tmp_path, monkeypatch) -> str:
    url = srv.lake_url()
    monkeypatch.setenv("M2M_CACHE_DIR", str(tmp_path / "writer-cache"))
    cfg = M2MConfig(path=url, latent_dim=64, shard_bytes=1 << 16, storage_options=srv.storage_options)
    with create_m2m(cfg) as lake:
        lake.add_splats(_rows(8000, 64, 0))
        assert len(lake.manifest.shards) >= 20
    monkeypatch.setenv("M2M_CACHE_DIR", str(tmp_path / "reader-cache"))  # the reader must download
    return url


def test_server_killed_after_export_gives_a_clear_error_in_time(s3_server_private, tmp_path, monkeypatch) -> None:
    srv = s3_server_private
    url = _fault_lake(srv, tmp_path, monkeypatch)
    with open_lake(url, storage_options=srv.storage_options, io_timeout=2.0, io_retries=1) as lake:
        dl = lake.export_to_dataloader(batch_size=256, shuffle=False)
        srv.stop()
        t0 = time.monotonic()
        with pytest.raises(ObjectStoreError) as info:  # itself, not wrapped (0 workers: the prefetch thread)
            for _ in dl:
                pass
        elapsed = time.monotonic() - t0
    text = f"{info.value} {info.value.__cause__}"
    print(f"killed: {type(info.value).__name__} after {elapsed:.1f} s: {text}")
    assert "_data/" in text and url.split("://")[1].split("/")[0] in text  # names the object
    assert elapsed < 30


def test_server_paused_as_the_epoch_reads_gives_a_clear_error_in_time(s3_server_private, tmp_path,
                                                                     monkeypatch) -> None:
    """SIGSTOP: connections are accepted and never answered (the read-timeout case, 408 s before).

    Shards are downloaded whole on first touch and the epoch touches every shard as it starts, so the
    server is paused after the loader is made and before the epoch's first batch."""
    srv = s3_server_private
    url = _fault_lake(srv, tmp_path, monkeypatch)
    timeout, retries = 2.0, 1
    with open_lake(url, storage_options=srv.storage_options, io_timeout=timeout, io_retries=retries,
                   prefetch=0, warm_bytes=1 << 18) as lake:
        dl = lake.export_to_dataloader(batch_size=100, shuffle=False)
        srv.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(M2MError) as info:
                for _ in dl:
                    pass
            elapsed = time.monotonic() - t0
        finally:
            srv.resume()
    text = f"{info.value} {info.value.__cause__}"
    print(f"paused: {type(info.value).__name__} after {elapsed:.1f} s: {text}")
    assert "_data/" in text and "io_timeout=2" in text
    # (retries + 1) requests of at most io_timeout each (connect + read) plus backoff, with slack
    assert elapsed < (retries + 1) * 2 * timeout + 10


@pytest.mark.parametrize("operation", ["append", "estimate_kappa"])
def test_a_commit_whose_version_a_vacuum_removed_meanwhile_is_rebased_not_lost(s3_server, s3_lake_url,
                                                                               monkeypatch, operation) -> None:
    # observed: while A built version 2, B committed versions 2 and 3 and vacuumed (keep=1) version 2's file;
    # A's create-if-absent put of version 2 then succeeded: add_splats returned ids that no later version held
    # (the next vacuum deleted their shard), estimate_kappa's kappas were in no head, and "version 2" named
    # other rows than the ones B had committed under it
    import m2m.lake.commit as commit

    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, storage_options=opts)) as a:
        a.add_splats(_rows(40, 8, 0))
    real = commit.write_manifest
    b_heads: list[int] = []
    started: list[bool] = []

    def b_commits_and_vacuums_first(fs, manifest, must_exist=()):  # type: ignore[no-untyped-def]
        if not started:                                 # (B's own commits come through here too)
            started.append(True)
            with open_lake(s3_lake_url, storage_options=opts) as b:
                b.add_splats(_rows(5, 8, 2))
                b.add_splats(_rows(5, 8, 3))
                b.vacuum(keep=1)
                b_heads.append(b.version)
        return real(fs, manifest, must_exist)

    monkeypatch.setattr(commit, "write_manifest", b_commits_and_vacuums_first)
    with open_lake(s3_lake_url, storage_options=opts) as a:
        if operation == "append":
            ids = a.add_splats(_rows(20, 8, 1))
        else:
            a.estimate_kappa()
        assert b_heads == [3] and a.version == 4    # rebased above B's versions, not version 2 again
    monkeypatch.setattr(commit, "write_manifest", real)
    with open_lake(s3_lake_url, storage_options=opts) as head:
        assert head.version == 4 and 2 not in head.versions()
        if operation == "append":
            assert len(head) == 70 and set(ids.tolist()) <= set(head.snapshot.ids().tolist())
        else:
            assert len(head) == 50 and np.isfinite(head.splats()["kappa"]).all()
        head.vacuum(keep=1, min_age_s=0)
    with open_lake(s3_lake_url, storage_options=opts) as head:
        assert len(head) == (70 if operation == "append" else 50) and head.verify() == []


def test_a_commit_a_newer_version_was_built_on_at_once_is_kept(s3_server, s3_lake_url, monkeypatch) -> None:
    # the other side of the check above: B compacts (rewriting A's file) and appends on top of A's version
    # between A's put and A's look at the versions; A's commit stands, its rows once in the head (judged by the
    # files alone it was withdrawn and rebased: its rows twice)
    import m2m.lake.commit as commit

    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, storage_options=opts)) as a:
        a.add_splats(_rows(40, 8, 0))
    real = commit.write_manifest
    started: list[bool] = []

    def b_builds_on_it_right_after(fs, manifest, must_exist=()):  # type: ignore[no-untyped-def]
        out = real(fs, manifest, must_exist)
        if not started:
            started.append(True)
            with open_lake(s3_lake_url, storage_options=opts) as b:
                b.compact()                             # version 3 rewrites A's file (it merges A's shard)
                assert len(b.manifest.shards) == 1
                b.add_splats(_rows(5, 8, 2))
        return out

    monkeypatch.setattr(commit, "write_manifest", b_builds_on_it_right_after)
    with open_lake(s3_lake_url, storage_options=opts) as a:
        ids = a.add_splats(_rows(20, 8, 1))
        assert a.version == 2
    monkeypatch.setattr(commit, "write_manifest", real)
    with open_lake(s3_lake_url, storage_options=opts) as head:
        got = head.snapshot.ids()
        assert head.version == 4 and len(head) == 65 and len(np.unique(got)) == 65
        assert set(ids.tolist()) <= set(got.tolist()) and head.verify() == []
