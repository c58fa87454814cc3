"""neighbourhood_kappa: agreement with the direct MLE per row, bias correction, masking, chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m import vmf
from m2m.errors import ConfigError
from m2m.geometry.kappa import neighbourhood_kappa


def _groups(groups: int, size: int, d: int, kappa: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``groups`` vMF clusters of ``size`` points each; neighbours = the other members of the group."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(groups, d, generator=g, dtype=torch.float64), dim=1)
    x = vmf.sample(centres, torch.full((groups,), kappa, dtype=torch.float64), size, generator=g)
    idx = np.arange(groups * size).reshape(groups, size)
    nb = np.stack([np.roll(idx, -s, axis=1) for s in range(1, size)], -1).reshape(groups * size, size - 1)
    return x.reshape(-1, d).numpy(), nb.astype(np.int64)


def test_matches_direct_estimate_per_row():
    mu, nb = _groups(20, 9, 32, 200.0)
    got = neighbourhood_kappa(mu, nb, bias_correction=False, chunk=7)
    sets = np.concatenate([mu[:, None, :], mu[nb]], axis=1)          # [N, 1 + k, d]
    want = vmf.estimate_kappa(torch.from_numpy(sets)).numpy()
    assert got.dtype == np.float32 and got.shape == (len(mu),)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bias_correction_centres_the_estimate():
    mu, nb = _groups(200, 17, 64, 300.0, seed=1)
    raw = neighbourhood_kappa(mu, nb, bias_correction=False)
    corrected = neighbourhood_kappa(mu, nb)
    assert np.mean(raw) > 310.0                      # E[rbar^2] = A^2 + (1 - A^2) / m biases upward
    assert np.mean(corrected) == pytest.approx(300.0, rel=0.02)


def test_diffuse_neighbourhood_goes_to_zero_with_correction():
    g = np.random.default_rng(0)
    mu = g.standard_normal((400, 128))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    nb = g.integers(0, 400, (400, 16))
    raw = neighbourhood_kappa(mu.astype(np.float32), nb, bias_correction=False)
    corrected = neighbourhood_kappa(mu.astype(np.float32), nb)
    assert np.median(raw) > 20.0
    assert np.median(corrected) < 0.5 * np.median(raw)


def test_missing_neighbours_self_references_and_include_self():
    mu, nb = _groups(4, 5, 16, 100.0)
    nb2 = nb.copy()
    nb2[0, :] = -1                                     # no neighbour: one point -> NaN
    nb2[1, 0] = 1                                      # self reference is ignored
    nb2[2, 1:] = -1                                    # a single neighbour: 2 points
    out = neighbourhood_kappa(mu, nb2)
    assert np.isnan(out[0])
    nb3 = nb.copy()
    nb3[1, 0] = -1
    assert out[1] == pytest.approx(neighbourhood_kappa(mu, nb3)[1], rel=1e-6)
    assert np.isfinite(out[2])
    excl = neighbourhood_kappa(mu, nb, include_self=False, bias_correction=False)
    want = vmf.estimate_kappa(torch.from_numpy(mu[nb[3]])).item()
    assert excl[3] == pytest.approx(want, rel=1e-5)


def test_float32_tight_sets_keep_precision():
    # near-duplicates: 1 - cos ~ 1e-6, where 1 - |mean|^2 in float32 would be pure rounding
    g = np.random.default_rng(3)
    base = g.standard_normal(256)
    base /= np.linalg.norm(base)
    pts = base + 1e-3 * g.standard_normal((17, 256)) / 16.0
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    nb = np.array([[j for j in range(17) if j != i] for i in range(17)], dtype=np.int64)
    got = neighbourhood_kappa(pts.astype(np.float32), nb, bias_correction=False)
    want = vmf.estimate_kappa(torch.from_numpy(pts)).item()
    assert got[0] == pytest.approx(want, rel=0.02)


def test_torch_input_and_validation():
    mu, nb = _groups(3, 4, 8, 50.0)
    a = neighbourhood_kappa(torch.from_numpy(mu).float(), torch.from_numpy(nb))
    b = neighbourhood_kappa(mu.astype(np.float32), nb)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ConfigError):
        neighbourhood_kappa(mu, nb[:-1])
    bad = nb.copy()
    bad[0, 0] = len(mu)
    with pytest.raises(ConfigError):
        neighbourhood_kappa(mu, bad)
    with pytest.raises(ConfigError):
        neighbourhood_kappa(mu, nb.astype(np.float64))


def test_rows_estimates_a_prefix_with_neighbours_anywhere():
    # the Ray engine's range task: its own rows first, neighbours living elsewhere after them
    mu, nb = _groups(3, 4, 8, 50.0)
    whole = neighbourhood_kappa(mu, nb)
    np.testing.assert_array_equal(neighbourhood_kappa(mu, nb[:5], rows=5), whole[:5])
    assert neighbourhood_kappa(mu, nb[:0], rows=0).shape == (0,)
    with pytest.raises(ConfigError, match="rows must be"):
        neighbourhood_kappa(mu, nb, rows=len(mu) + 1)
    with pytest.raises(ConfigError, match=r"neighbors must be \[rows=5"):
        neighbourhood_kappa(mu, nb, rows=5)
