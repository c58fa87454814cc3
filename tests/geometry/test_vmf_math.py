"""A_d, log C_d and log I_nu against mpmath high-precision references, over d in [2, 4096] and
kappa in [1e-3, 1e6]; and the inversion kappa_from_mean_resultant."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch

from m2m import vmf
from m2m.errors import ConfigError

DIMS = [2, 3, 5, 16, 81, 82, 384, 640, 1024, 4096]
KAPPAS = [1e-3, 0.05, 1.0, 7.5, 84.0, 300.0, 1800.0, 4.8e3, 4e4, 1e6]
TOL = 1e-9  # the contract asks for 1e-6; the implementation is ~1e-12


def _reference(d: int, k: float) -> tuple[float, float, float]:
    mp.mp.dps = 40
    nu = mp.mpf(d) / 2 - 1
    i0 = mp.besseli(nu, k, maxterms=10**6)
    i1 = mp.besseli(nu + 1, k, maxterms=10**6)
    log_c = nu * mp.log(k) - (mp.mpf(d) / 2) * mp.log(2 * mp.pi) - mp.log(i0)
    return float(i1 / i0), float(log_c), float(mp.log(i0))


@pytest.fixture(scope="module")
def references() -> dict[tuple[int, float], tuple[float, float, float]]:
    return {(d, k): _reference(d, k) for d in DIMS for k in KAPPAS}


def test_mean_resultant_length_matches_mpmath(references):
    for d in DIMS:
        got = vmf.mean_resultant_length(torch.tensor(KAPPAS, dtype=torch.float64), d)
        want = torch.tensor([references[(d, k)][0] for k in KAPPAS], dtype=torch.float64)
        rel = ((got - want).abs() / want).max().item()
        assert rel < TOL, (d, rel)


def test_log_normalizer_matches_mpmath(references):
    for d in DIMS:
        got = vmf.log_normalizer(torch.tensor(KAPPAS, dtype=torch.float64), d)
        want = torch.tensor([references[(d, k)][1] for k in KAPPAS], dtype=torch.float64)
        err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
        assert err < TOL, (d, err)


def test_log_bessel_iv_matches_mpmath(references):
    for d in DIMS:
        got = vmf.log_bessel_iv(d / 2 - 1, torch.tensor(KAPPAS, dtype=torch.float64))
        want = torch.tensor([references[(d, k)][2] for k in KAPPAS], dtype=torch.float64)
        err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
        assert err < TOL, (d, err)


def test_large_order_where_scipy_underflows():
    # scipy.special.ive(511, 84) underflows; the contract's example point.
    a = vmf.mean_resultant_length(84.0, 1024).item()
    assert math.isfinite(a) and 0.0 < a < 0.1
    assert math.isfinite(vmf.log_normalizer(84.0, 1024).item())


def test_kappa_zero_is_uniform():
    for d in (2, 3, 640):
        assert vmf.mean_resultant_length(0.0, d).item() == 0.0
        area = math.log(2.0) + (d / 2) * math.log(math.pi) - math.lgamma(d / 2)
        assert vmf.log_normalizer(0.0, d).item() == pytest.approx(-area, rel=1e-12)
        # continuity at small kappa
        assert vmf.log_normalizer(1e-9, d).item() == pytest.approx(-area, rel=1e-8)


def test_style_guide_numbers():
    assert vmf.mean_resultant_length(50.0, 384).item() == pytest.approx(0.128, abs=1e-3)
    k384 = vmf.kappa_from_mean_resultant(0.9, 384).item()
    k1024 = vmf.kappa_from_mean_resultant(0.9, 1024).item()
    assert 1.7e3 < k384 < 1.9e3 and 4.6e3 < k1024 < 5.0e3


@pytest.mark.parametrize("d", [2, 3, 16, 384, 4096])
def test_kappa_inversion_round_trip(d):
    kappa = torch.tensor(np.logspace(-3, 6, 37), dtype=torch.float64)
    rbar = vmf.mean_resultant_length(kappa, d)
    back = vmf.kappa_from_mean_resultant(rbar, d)
    rel = ((back - kappa).abs() / kappa).max().item()
    assert rel < 1e-6, rel


def test_kappa_inversion_edges():
    assert vmf.kappa_from_mean_resultant(0.0, 10).item() == 0.0
    assert vmf.kappa_from_mean_resultant(1.0, 10).item() == pytest.approx(vmf.KAPPA_MAX, rel=1e-3)
    with pytest.raises(ConfigError):
        vmf.kappa_from_mean_resultant(1.5, 10)
    with pytest.raises(ConfigError):
        vmf.kappa_from_mean_resultant(float("nan"), 10)
    with pytest.raises(ConfigError):
        vmf.mean_resultant_length(-1.0, 10)
    with pytest.raises(ConfigError):
        vmf.log_normalizer(1.0, 1)


def test_dtype_and_batching():
    k32 = torch.tensor([[1.0, 2.0], [3.0, 4000.0]], dtype=torch.float32)
    out = vmf.mean_resultant_length(k32, 64)
    assert out.dtype == torch.float32 and out.shape == (2, 2)
    assert vmf.log_normalizer(5.0, 64).dtype == torch.float64
    # a tensor of dims broadcasts against kappa
    dims = torch.tensor([3, 64, 640])
    a = vmf.mean_resultant_length(torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64), dims)
    for i, d in enumerate((3, 64, 640)):
        assert a[i].item() == pytest.approx(vmf.mean_resultant_length(10.0, d).item(), rel=1e-14)
