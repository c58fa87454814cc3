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
