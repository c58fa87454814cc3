"""A mixture of a remote lake (moto S3, node cache) and a local one: proportions, values and resume,
with and without DataLoader workers (docs/stream.md, "Mixing lakes")."""

from __future__ import annotations

import copy
import itertools
import os

import numpy as np
import pytest
import torch

import m2m
from m2m import M2MConfig, create_m2m, open_lake

from .helpers import DIM, make_lake, unit_rows

BS = 40


def epoch(dl: object) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in b.items()} for b in dl]  # type: ignore[attr-defined]


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_remote_and_local_lakes_mixed(s3_bucket, tmp_path, workers: int) -> None:
    url = f"{s3_bucket}/lake"
    make_lake(url, 1500)  # several shards in the bucket
    local = str(tmp_path / "local")
    with create_m2m(M2MConfig(path=local, latent_dim=DIM)) as lake:
        lake.add_splats(unit_rows(400, seed=3))
    remote_kw = {"cache_dir": str(tmp_path / "cache")}  # credentials and endpoint: s3_env
    stored = {}
    with open_lake(url, **remote_kw) as r, open_lake(local) as loc:
        for name, lake in (("s3", r), ("disk", loc)):
            s = lake.splats()
            stored[name] = dict(zip(s["id"].tolist(), s["mu"].astype(np.float32)))
        base = dict(batch_size=BS, columns=("id", "embedding"), seed=4, world_size=2)
        kw = dict(base, num_workers=workers)
        if workers:
            kw.update(multiprocessing_context="fork", timeout=120)
        mx = m2m.mix({"s3": r, "disk": loc}, {"s3": 0.25, "disk": 0.75}, epoch_rows=1200)
        ref = [epoch(mx.export_to_dataloader(rank=rk, **base)) for rk in range(2)]
        got = []
        for rk in range(2):
            dl = mx.export_to_dataloader(rank=rk, **kw)
            got.append(epoch(dl))
            same(got[rk], ref[rk])
        if workers == 0:
            assert "fetch" in dl.stats()  # the remote part's node-cache downloads
        src = np.concatenate([torch.cat([b["source"] for b in g]).numpy() for g in got])
        assert np.bincount(src, minlength=2).tolist() == [300, 900]
        for g in got:
            for b in g:
                for i, code, emb in zip(b["id"].tolist(), b["source"].tolist(), b["embedding"].numpy()):
                    np.testing.assert_array_equal(emb, stored[mx.names[code]][i])
        dl0 = mx.export_to_dataloader(rank=0, **kw)
        list(itertools.islice(iter(dl0), 5))
        state = dl0.state_dict()
        dl0.close()
    with open_lake(url, **remote_kw) as r, open_lake(local) as loc:
        again = m2m.mix({"s3": r, "disk": loc}, {"s3": 0.25, "disk": 0.75}, epoch_rows=1200)
        for rk in range(2):
            dl = again.export_to_dataloader(rank=rk, **kw)
            dl.load_state_dict(copy.deepcopy(state))
            same(epoch(dl), ref[rk][5:])
            dl.close()
    assert os.path.isdir(str(tmp_path / "cache"))


@pytest.mark.timeout(300)
def test_a_remote_lake_in_a_mixture_downloads_ahead_in_first_use_order(s3_bucket, tmp_path) -> None:
    """The remote part gets the download-ahead plan it gets alone: its shards in the order the
    epoch first reads them (so its node cache fetches the next ones while the stream reads)."""
    url = f"{s3_bucket}/ahead"
    make_lake(url, 1500)
    local = str(tmp_path / "local")
    with create_m2m(M2MConfig(path=local, latent_dim=DIM)) as lake:
        lake.add_splats(unit_rows(400, seed=3))
    with open_lake(url, cache_dir=str(tmp_path / "cache")) as r, open_lake(local) as loc:
        snap = r.snapshot
        assert snap.is_remote and snap._prefetch_plan is None
        mx = m2m.mix({"s3": r, "disk": loc}, {"s3": 0.5, "disk": 0.5}, epoch_rows=1900)
        got = epoch(mx.export_to_dataloader(batch_size=BS, columns=("id",), seed=4))
        assert snap._prefetch_plan is not None, "no download-ahead plan for the remote part"
        order = snap._prefetch_plan[0]
        src = torch.cat([b["source"] for b in got]).numpy()
        ids = torch.cat([b["id"] for b in got]).numpy()[src == 0]      # the remote lake's rows (ids = positions)
        shards = np.searchsorted(np.asarray(snap.shard_offsets), ids, side="right") - 1
        first_use = list(dict.fromkeys(shards.tolist()))
        assert len(first_use) > 3 and order == first_use
        fetched = snap.fetch_stats()["fetches"]
        assert fetched and max(fetched.values()) == 1                    # each shard downloaded once


def test_a_mixtures_export_downloads_no_shard_before_its_first_batch(s3_bucket, tmp_path) -> None:
    # the mixture's column check read shard 0 of each lake (a whole download of a remote one, on every
    # rank) to learn what the manifest already says (a probing user, 2026-12-08)
    url = f"{s3_bucket}/lake"
    make_lake(url, 1500)
    local = str(tmp_path / "local")
    with create_m2m(M2MConfig(path=local, latent_dim=DIM)) as lake:
        lake.add_splats(unit_rows(100, seed=3))
    cache = str(tmp_path / "cache")
    remote = open_lake(url, cache_dir=cache)
    dl = m2m.mix({"r": remote, "l": local}, {"r": 1, "l": 1}).export_to_dataloader(
        batch_size=BS, columns=("embedding", "id", "source"))
    assert not [f for f in os.listdir(cache) if f.endswith(".shard")] if os.path.isdir(cache) else True
    assert sum(len(b["id"]) for b in dl) == 1600
    remote.close()
