"""Statistical checks of the Langevin chains against closed-form vMF and vMF-mixture moments.

Many parallel chains, seeded; MALA makes the target exactly invariant, so long runs must match it.
"""

from __future__ import annotations

import math

import pytest
import torch

from m2m import langevin, vmf
from m2m.augment.energy import step_length
from m2m.errors import ConfigError, InvalidEmbeddingError
from m2m.geometry.sphere import random_point_at_cosine

F64 = torch.float64


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1)


def _one_component(b: int, d: int, kappa: float, seed: int = 0):
    mu0 = _unit(d, seed=seed)
    mu = mu0.expand(b, 1, d).contiguous()
    return mu0, mu, torch.full((b, 1), kappa, dtype=F64), torch.ones(b, 1, dtype=F64)


def _vmf_var(kappa: float, d: int) -> float:
    a = vmf.mean_resultant_length(kappa, d).item()
    return 1.0 - a * a - (d - 1) * a / kappa


@pytest.mark.parametrize("d,kappa", [(16, 50.0), (48, 400.0)])
def test_single_vmf_mala_matches_mean_and_variance(d, kappa):
    b = 4000
    mu0, mu, k, a = _one_component(b, d, kappa)
    # start away from the equilibrium: points at cosine 0.3 to the mean
    x0 = random_point_at_cosine(mu0.expand(b, d), torch.full((b,), 0.3, dtype=F64),
                                generator=torch.Generator().manual_seed(1))
    x = langevin.sample(x0, mu, k, a, steps=150, step_size=0.5, generator=torch.Generator().manual_seed(2),
                        metropolis=True)
    c = x @ mu0
    mean, var = vmf.mean_resultant_length(kappa, d).item(), _vmf_var(kappa, d)
    assert abs(c.mean().item() - mean) < 5 * math.sqrt(var / b)
    assert c.var().item() == pytest.approx(var, rel=0.12)
    assert torch.allclose(x.norm(dim=1), torch.ones(b, dtype=F64))


def test_single_vmf_small_step_ula_is_close():
    d, kappa, b = 16, 50.0, 4000
    mu0, mu, k, a = _one_component(b, d, kappa)
    x = langevin.sample(mu0.expand(b, d), mu, k, a, steps=200, step_size=0.05,
                        generator=torch.Generator().manual_seed(3))
    # ULA's O(step) bias: the stationary spread is ~1 / (1 - step/2) too wide
    assert (x @ mu0).mean().item() == pytest.approx(vmf.mean_resultant_length(kappa, d).item(), abs=0.01)


def test_temperature_tempers_a_vmf_to_kappa_over_t():
    d, kappa, temp, b = 16, 60.0, 2.0, 4000
    mu0, mu, k, a = _one_component(b, d, kappa)
    x = langevin.sample(mu0.expand(b, d), mu, k, a, steps=150, step_size=0.5, temperature=temp,
                        generator=torch.Generator().manual_seed(4), metropolis=True)
    c = x @ mu0
    want = vmf.mean_resultant_length(kappa / temp, d).item()
    assert abs(c.mean().item() - want) < 5 * math.sqrt(_vmf_var(kappa / temp, d) / b)
    assert abs(c.mean().item() - vmf.mean_resultant_length(kappa, d).item()) > 0.05


def _mixture_moments(mus: torch.Tensor, kappas: list[float], alphas: list[float], d: int):
    """E[x] and E[x x^T] of sum_j w_j vMF(mu_j, kappa_j), w_j = alpha_j / sum alpha (closed form)."""
    w = torch.tensor(alphas, dtype=F64) / sum(alphas)
    mean = torch.zeros(d, dtype=F64)
    second = torch.zeros(d, d, dtype=F64)
    for j, kap in enumerate(kappas):
        a = vmf.mean_resultant_length(kap, d).item()
        mean += w[j] * a * mus[j]
        second += w[j] * ((a / kap) * torch.eye(d, dtype=F64) + (1 - d * a / kap) * torch.outer(mus[j], mus[j]))
    return w, mean, second


def test_two_component_mixture_weights_and_moments():
    # unequal alpha and kappa; all chains start on the *less* massive mode, so the closed-form weights
    # alpha_j (which need the C_d normalisation) are only reached by mixing between the modes.
    d, b = 3, 3000
    mus = torch.eye(d, dtype=F64)[:2]
    kappas, alphas = [6.0, 15.0], [3.0, 1.0]
    mu = mus.expand(b, 2, d).contiguous()
    k = torch.tensor(kappas, dtype=F64).expand(b, 2)
    a = torch.tensor(alphas, dtype=F64).expand(b, 2)
    x = langevin.sample(mus[1].expand(b, d), mu, k, a, steps=1500, step_size=0.6,
                        generator=torch.Generator().manual_seed(5), metropolis=True)
    w, mean, second = _mixture_moments(mus, kappas, alphas, d)
    se = math.sqrt(1.0 / b)
    assert torch.allclose(x.mean(0), mean, atol=4 * se)
    assert torch.allclose(x.T @ x / b, second, atol=4 * se)
    # mass near each mode (overlap of the components across the bisector is ~1% here)
    near_first = ((x @ mus[0]) > (x @ mus[1])).double().mean().item()
    assert near_first == pytest.approx(w[0].item(), abs=0.04)


def test_mixture_with_masked_component_ignores_it():
    d, b = 8, 2000
    mus = torch.eye(d, dtype=F64)[:3]
    mu = mus.expand(b, 3, d).contiguous()
    k = torch.tensor([30.0, 30.0, 30.0], dtype=F64).expand(b, 3)
    a = torch.ones(b, 3, dtype=F64)
    mask = torch.tensor([True, False, False]).expand(b, 3)
    x = langevin.sample(mus[1].expand(b, d), mu, k, a, steps=300, step_size=0.5, mask=mask,
                        generator=torch.Generator().manual_seed(6), metropolis=True)
    want = vmf.mean_resultant_length(30.0, d).item()
    assert (x @ mus[0]).mean().item() == pytest.approx(want, abs=0.02)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    both = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, both, right=True).double() / a.numel()
    fb = torch.searchsorted(b.sort().values, both, right=True).double() / b.numel()
    return (fa - fb).abs().max().item()


@pytest.mark.parametrize("metropolis", [False, True])
def test_two_coordinate_chain_matches_the_full_chain(metropolis):
    # finite-time law (5 steps from the mean), not only the stationary one
    d, kappa, b = 64, 300.0, 6000
    mu0, mu, k, a = _one_component(b, d, kappa)
    x = langevin.sample(mu0.expand(b, d), mu, k, a, steps=5, step_size=0.3,
                        generator=torch.Generator().manual_seed(7), metropolis=metropolis)
    # With MALA ~47% of the chains reject all 5 proposals and stay at their start, an atom at cosine 1.
    # The two-coordinate chain puts it at exactly t = 1.0; the batched float64 x @ mu0 (a blocked gemv
    # whose summation order differs from a single dot) rounds it to 1 + 2.2e-16 on torch 2.13, so an
    # unclamped KS compares the atom's two roundings (0.46) instead of the laws. Cosines of unit
    # vectors are <= 1: clamping removes only that rounding.
    full = (x @ mu0).clamp(max=1.0)
    h = step_length(0.3, k, None, d, 1.0)
    own = langevin.own_component_chain(h, k[:, 0], 5, d, torch.Generator().manual_seed(8), metropolis)
    t, rho = own.t, own.rho
    assert torch.allclose(t * t + rho * rho, torch.ones(b, dtype=F64))
    # KS critical value at alpha = 1e-3 for two samples of 6000: 1.95 * sqrt(2 / 6000) = 0.036
    assert _ks(full, t) < 0.036


def test_float32_inputs_and_zero_steps():
    d, b = 32, 64
    mu0, mu, k, a = _one_component(b, d, 500.0)
    x = langevin.sample(mu0.expand(b, d).float(), mu.float(), k.float(), a.float(), steps=5, step_size=0.3,
                        generator=torch.Generator().manual_seed(9))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.allclose(x.norm(dim=1), torch.ones(b), atol=1e-5)
    same = langevin.sample(mu0.expand(b, d), mu, k, a, steps=0, step_size=0.3)
    assert torch.equal(same, mu0.expand(b, d))


def test_sample_validation():
    d, b = 8, 4
    mu0, mu, k, a = _one_component(b, d, 10.0)
    x = mu0.expand(b, d)
    with pytest.raises(ConfigError):
        langevin.sample(x, mu, -k, a, 3, 0.1)
    with pytest.raises(ConfigError):
        langevin.sample(x, mu, k, 0 * a, 3, 0.1)
    with pytest.raises(ConfigError):
        langevin.sample(x, mu, k, a, 3, 0.1, mask=torch.zeros(b, 1, dtype=torch.bool))
    with pytest.raises(InvalidEmbeddingError):
        langevin.sample(x[:, :4], mu, k, a, 3, 0.1)
    with pytest.raises(InvalidEmbeddingError):
        langevin.sample(torch.zeros(b, d, dtype=F64), mu, k, a, 3, 0.1)
