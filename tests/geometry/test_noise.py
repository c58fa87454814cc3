"""HostNoise: the law of its Gaussian, uniform and Gamma draws, determinism, and the fallbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from m2m.geometry.noise import HostNoise, box_muller_, normal_


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
    assert np.abs(z).max() <= math.sqrt(-2.0 * math.log(2.0**-24)) + 1e-5   # the cut of 24-bit uniforms


@pytest.mark.parametrize("n", [1, 2, 5, 4096])
def test_box_muller_is_the_transform_of_the_raw_words(n):
    """Each output is r cos or r sin of one pair of the generator's words (u1 from the first half of the
    words, the angle from the second), recomputed here in float64 from the same words."""
    out = np.empty(n, np.float32)
    box_muller_(out, np.random.SFC64(11))
    m = (n + 1) // 2
    words = np.random.SFC64(11).random_raw(m).view(np.uint32).astype(np.float64)
    u1 = (np.floor(words[:m] / 256.0) + 1.0) / 2.0**24
    angle = 2.0 * math.pi * words[m:] / 2.0**32
    r = np.sqrt(-2.0 * np.log(u1))
    want = np.concatenate([r * np.cos(angle), (r * np.sin(angle))[: n - m]])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_the_gaussian_count_does_not_move_the_other_draws():
    """The fills draw from their own stream: a batch's scalars do not depend on how many Gaussians were drawn
    before them (the prefetch thread and the in-line call may draw the direction at different sizes)."""
    a, b = HostNoise.of(_gen(5)), HostNoise.of(_gen(5))
    a.normal_(torch.empty(10))
    b.normal_(torch.empty(100_003))
    assert np.array_equal(a.uniform((64,)), b.uniform((64,)))


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
