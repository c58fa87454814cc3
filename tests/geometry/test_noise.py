"""HostNoise: the law of its Gaussian, uniform and Gamma draws, determinism, and the fallbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from m2m.geometry.noise import HostNoise, normal_


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_normal_matches_the_standard_normal_law():
    out = torch.empty(400_001)                      # odd: the last Box-Muller pair is half used
    HostNoise.of(_gen(0)).normal_(out)
    z = out.double().numpy()
    assert np.isfinite(z).all()
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2.0 / z.size)
    assert abs(stats.kurtosis(z, fisher=False) - 3.0) < 0.05
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert np.abs(z).max() < 6.8                    # the documented cut of 32-bit uniforms


def test_pairs_and_neighbours_are_uncorrelated():
    out = torch.empty(200_000)
    HostNoise.of(_gen(1)).normal_(out)
    z = out.double().numpy()
    half = z.size // 2
    for a, b in ((z[:half], z[half:]), (z[:-1], z[1:])):   # Box-Muller partners, then adjacent draws
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.015
        assert abs(np.corrcoef(a * a, b * b)[0, 1]) < 0.015


def test_draws_are_a_function_of_the_torch_generator():
    a, b, c = torch.empty(1000), torch.empty(1000), torch.empty(1000)
    normal_(a, _gen(7))
    normal_(b, _gen(7))
    normal_(c, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    host = HostNoise.of(_gen(3))
    assert HostNoise.of(host) is host


def test_uniform_and_gamma_laws():
    host = HostNoise.of(_gen(2))
    u = host.uniform((50_000,))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    g = host.standard_gamma(319.0, (50_000,))
    assert stats.kstest(g, stats.gamma(319.0).cdf).pvalue > 1e-3
    n = host.standard_normal((50_000,))
    assert stats.kstest(n, "norm").pvalue > 1e-3


@pytest.mark.parametrize("kind", ["float64", "strided"])
def test_other_tensors_fall_back_to_torch_with_a_derived_generator(kind):
    base = torch.empty(2000, 2, dtype=torch.float64 if kind == "float64" else torch.float32)
    out = base if kind == "float64" else base[:, 0]
    normal_(out, HostNoise.of(_gen(4)))
    again = torch.empty_like(base)
    normal_(again if kind == "float64" else again[:, 0], HostNoise.of(_gen(4)))
    assert torch.equal(out, again if kind == "float64" else again[:, 0])
    assert stats.kstest(out.double().reshape(-1).numpy(), "norm").pvalue > 1e-3


def test_fill_rejects_what_it_cannot_fill():
    with pytest.raises(ValueError, match="float32"):
        HostNoise.of(_gen(0)).normal_(torch.empty(4, dtype=torch.float64))
    empty = torch.empty(0)
    assert HostNoise.of(_gen(0)).normal_(empty) is empty
