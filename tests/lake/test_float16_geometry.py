"""A float16 lake's geometry reads its rows renormalised, as the kNN and the Ray engine do (a probing
user, 2026-12-07: consolidate, criticality and estimate_kappa used the float16 rows as read, |mu|^2 =
0.99993, so bit-identical rows sat at cosine 0.99993: `similarity=1.0` merged nothing and kappa moved
by -12% to +7% at kappa ~ 7.6e4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m

D = 64


def _clusters(n_per: int = 40, clusters: int = 5, spread: float = 0.004, seed: int = 0) -> np.ndarray:
    """Tight clusters whose float16 rows are the lake's exactly (float32 lakes get the same values)."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((clusters, D))
    x = np.repeat(cent, n_per, axis=0) + spread * rng.standard_normal((clusters * n_per, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


def _lake(tmp_path: Path, name: str, dtype: str, x: np.ndarray):  # type: ignore[no-untyped-def]
    lake = create_m2m(M2MConfig(path=tmp_path / name, latent_dim=D, storage_dtype=dtype, knn_k=8))
    lake.add_splats(x)
    return lake


def _off_unit_row() -> np.ndarray:
    """A unit row whose float16 rounding is shorter than unit by more than float32 rounding."""
    rng = np.random.default_rng(1)
    while True:
        r = rng.standard_normal(D)
        r /= np.linalg.norm(r)
        if 1.0 - float(np.sum(r.astype(np.float16).astype(np.float64) ** 2)) > 3e-5:   # below: cosine < 1
            return r[None].astype(np.float32)


def test_identical_float16_rows_merge_at_similarity_one(tmp_path: Path) -> None:
    rows = np.repeat(_off_unit_row(), 10, axis=0)
    for dtype in ("float16", "float32"):
        with _lake(tmp_path, dtype, dtype, rows) as lake:
            assert lake.criticality(similarity=0.99999)["redundancy"] == pytest.approx(0.9), dtype
            lake.consolidate(similarity=1.0)
            assert len(lake) == 1, dtype


def test_float16_kappa_is_that_of_its_rows_renormalised(tmp_path: Path) -> None:
    with _lake(tmp_path, "f16", "float16", _clusters(spread=0.05)) as lake:
        k16 = lake.estimate_kappa()
        stored = np.concatenate([lake.snapshot.column(s, "mu") for s in range(len(lake.manifest.shards))])
        nb_cos = np.concatenate([lake.snapshot.column(s, "neighbor_cos") for s in range(len(lake.manifest.shards))])
    assert nb_cos.max() <= 1.0 + 1e-6
    unit = stored.astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    with _lake(tmp_path, "f32", "float32", unit.astype(np.float32)) as lake:
        k32 = lake.estimate_kappa()
    assert float(np.median(k16)) > 1e4      # concentrated enough for float16 norms to matter
    np.testing.assert_allclose(k16, k32, rtol=1e-2)
