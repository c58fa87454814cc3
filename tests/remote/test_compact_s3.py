"""Compaction and random access on a real S3 API server (moto): the many-writer protocol holds."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import m2m.lake.compact as compact_mod
from m2m import M2MConfig, create_m2m, open_lake

WRITER = str(Path(__file__).with_name("_writer.py"))
DIM = 8


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _columns(lake) -> dict[str, np.ndarray]:
    snap = lake.snapshot
    return {name: snap.read_all(name) for name in ("id", "mu", "kappa", "alpha")}


def _same(a: dict, b: dict) -> None:
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


def test_compact_on_s3_keeps_values_and_pinned_readers(s3_server, s3_lake_url, tmp_path) -> None:
    opts = s3_server.storage_options
    cfg = M2MConfig(path=s3_lake_url, latent_dim=DIM, storage_options=opts, knn_k=4, prefetch=0)
    with create_m2m(cfg) as lake:
        for i in range(8):
            lake.add_splats(_rows(30, i), alpha=np.full(30, float(i + 1)))
        lake.estimate_kappa()
        for i in range(3):
            lake.add_splats(_rows(30, 50 + i))
        before, v_before = _columns(lake), lake.version
        dl = lake.export_to_dataloader(batch_size=32, columns=("id", "embedding"), seed=1)
        it = iter(dl)
        seen = next(it)["id"].tolist()
        with open_lake(s3_lake_url, storage_options=opts) as other:
            report = other.compact()
            assert report.shards_before == 11 and report.shards_after == 2 and report.version == v_before + 1
            _same(before, _columns(other))
            assert other.verify() == []
            assert [f.columns for f in other.manifest.shards[0].files][1] == ("id", "kappa", "neighbors",
                                                                              "neighbor_cos", "neighbor_kappa",
                                                                              "neighbor_alpha")
        for b in it:                       # the stream keeps reading version v_before
            seen += b["id"].tolist()
        assert sorted(seen) == before["id"].tolist()
        lake.refresh()
        _same(before, _columns(lake))
        with open_lake(s3_lake_url, storage_options=opts, version=v_before) as old:
            _same(before, _columns(old))


def test_compaction_never_spans_ids_reserved_by_an_append_in_flight(s3_server, s3_lake_url) -> None:
    """A reserves ids and writes; meanwhile B appends and compacts; A's ids and rows survive as reserved."""
    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=DIM, storage_options=opts)) as a, \
            open_lake(s3_lake_url, storage_options=opts) as b:
        for i in range(4):
            a.add_splats(_rows(10, i))
        b.refresh()
        done: list[object] = []

        def b_appends_and_compacts(_: int) -> None:
            if not done:
                b.add_splats(_rows(5, 9))
                done.append(b.compact())

        a_ids = a.add_splats(_rows(20, 7), alpha=np.full(20, 3.0), progress=b_appends_and_compacts)
        report = done[0]
        assert report.version is not None and report.shards_merged == 4  # not across A's reserved range
        assert a_ids.tolist() == list(range(40, 60))   # A was not rewritten
        a.refresh()
        ids = a.snapshot.ids()
        assert ids.tolist() == list(range(65)) and a.verify() == []
        assert (a.take(a_ids)["alpha"] == 3.0).all()


def test_compaction_rebases_on_appends_and_replans_after_a_rewrite(s3_server, s3_lake_url, monkeypatch) -> None:
    opts = s3_server.storage_options
    cfg = M2MConfig(path=s3_lake_url, latent_dim=DIM, storage_options=opts, knn_k=4)
    with create_m2m(cfg) as lake:
        for i in range(5):
            lake.add_splats(_rows(20, i))
        events: list[str] = []

        def meanwhile() -> None:
            with open_lake(s3_lake_url, storage_options=opts, knn_k=4) as other:
                if not events:
                    other.add_splats(_rows(3, 99))          # the run is still valid: rebased onto it
                    events.append("append")
                elif len(events) == 1:
                    other.estimate_kappa()                  # every run is stale: planned again
                    events.append("kappa")

        monkeypatch.setattr(compact_mod, "compact", functools.partial(compact_mod.compact, after_write=meanwhile))
        r1 = lake.compact()
        assert r1.version == lake.version and r1.runs_dropped == 0 and len(lake) == 103
        lake.add_splats(_rows(4, 100))
        r2 = lake.compact()
        assert events == ["append", "kappa"] and r2.runs_dropped >= 1 and r2.version == lake.version
        assert len(lake) == 107 and lake.verify() == [] and lake.snapshot.ids().tolist() == list(range(107))
        assert all(len(s.files) == 2 for s in lake.manifest.shards)   # the sidecars were kept, merged


@pytest.mark.slow
def test_compaction_with_writer_processes_appending(s3_server, s3_lake_url) -> None:
    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=DIM, storage_options=opts)) as lake:
        lake.add_splats(_rows(10, 0))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")) if p))
        procs = [subprocess.Popen([sys.executable, WRITER, s3_lake_url, json.dumps(opts), str(w), "8", "5"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for w in range(2)]
        compactions = 0
        try:
            while any(p.poll() is None for p in procs):
                lake.refresh()
                if lake.compact().version is not None:
                    compactions += 1
                time.sleep(0.05)
            outs = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err.decode()[-3000:]
        written = [i for out, _ in outs for line in out.decode().splitlines() for i in json.loads(line)["ids"]]
        lake.refresh()
        lake.compact()
        ids = lake.snapshot.ids().tolist()
        assert len(written) == 80 and set(written) <= set(ids) and len(ids) == 90 == len(set(ids))
        assert lake.verify() == [] and compactions >= 1


def test_random_access_through_the_node_cache(s3_server, s3_lake_url, tmp_path) -> None:
    opts = s3_server.storage_options
    cfg = M2MConfig(path=s3_lake_url, latent_dim=DIM, storage_dtype="float16", storage_options=opts,
                    cache_dir=str(tmp_path / "cache"))
    with create_m2m(cfg) as lake:
        for i in range(4):
            lake.add_splats(_rows(25, i), labels=[f"l{j}" for j in range(25)], metadata={"k": np.arange(25) + i})
    with open_lake(s3_lake_url, storage_options=opts, cache_dir=str(tmp_path / "cache2")) as lake:
        ref = lake.splats()
        snap = lake.snapshot
        row = lake[60]
        assert row["id"] == 60 and row["mu"].tobytes() == snap.read_all("mu")[60].tobytes()
        assert row["label"] == ref["label"][60]
        pos = np.random.default_rng(0).integers(0, 100, 40)
        got = lake.take(ref["id"][pos])
        assert got["mu"].tobytes() == snap.read_all("mu")[pos].tobytes()
        assert list(got["label"]) == list(ref["label"][pos]) and got["k"].tolist() == ref["k"][pos].tolist()
