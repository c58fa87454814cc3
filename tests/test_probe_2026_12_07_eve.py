"""Combination bugs found by probing users on 2026-12-07 (evening) that fit no other test module."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import DimensionMismatchError

D = 4


def test_open_lake_refuses_a_dim_or_dtype_keyword_the_lake_does_not_have(tmp_path):
    # open_lake(p, storage_dtype="float32") on a float16 lake opened it without a word, while the same
    # setting in config= was refused
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=D, storage_dtype="float16")) as lk:
        lk.add_splats(np.eye(D))
    for kw in (dict(storage_dtype="float32"), dict(latent_dim=999)):
        with pytest.raises(DimensionMismatchError, match=f"open_lake was given {next(iter(kw))}="):
            open_lake(tmp_path / "l", **kw)
    with open_lake(tmp_path / "l", storage_dtype="float16", latent_dim=D) as lk:   # the lake's own: fine
        assert len(lk) == D


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_float_labels_are_checked_without_warnings(dtype):
    with create_m2m(M2MConfig(latent_dim=D)) as lk, warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.add_splats(np.eye(D), labels=np.arange(D).astype(dtype))
        assert lk.to_arrow()["label"].to_pylist() == list(range(D))


def test_open_lake_moves_to_the_new_head_when_the_one_it_read_was_vacuumed_meanwhile(tmp_path, monkeypatch):
    # beside a writer that appends, compacts and vacuums (keep=1), about 1 open in 16,000 read the head,
    # then found its files gone (a newer head published and the old one vacuumed) and called a healthy
    # lake damaged (CorruptShardError "shard file ... is missing")
    import m2m.api as api

    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=D)) as lk:
        for k in range(3):
            lk.add_splats(np.random.default_rng(k).standard_normal((20, D)))
        stale = lk.manifest
        lk.compact()
        lk.vacuum(keep=1, min_age_s=0)
        head = lk.version
    real = api.read_manifest
    calls: list[object] = []

    def read(fs, version=None):  # the first read sees the head before the writer's commit
        calls.append(version)
        return stale if len(calls) == 1 else real(fs, version)

    monkeypatch.setattr(api, "read_manifest", read)
    with open_lake(tmp_path / "l") as lk:
        assert lk.version == head and len(lk) == 60 and calls == [None, None]
