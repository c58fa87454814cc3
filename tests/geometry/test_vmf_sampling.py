"""Wood's vMF sampler: closed-form moments, shapes, large d and kappa, determinism; estimate_kappa."""

from __future__ import annotations

import math

import pytest
import torch

from m2m import vmf
from m2m.errors import ConfigError, InvalidEmbeddingError


def _mu(d: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(d)
    m = torch.randn(d, generator=g, dtype=dtype)
    return m / m.norm()


@pytest.mark.parametrize("d,kappa", [(2, 0.0), (3, 1.0), (16, 50.0), (64, 3.0), (384, 1800.0),
                                     (640, 1e6), (1024, 84.0)])
def test_mean_and_variance_of_cosine(d, kappa):
    n = 20000
    mu = _mu(d)
    x = vmf.sample(mu, kappa, n, generator=torch.Generator().manual_seed(7))
    assert x.shape == (n, d)
    assert torch.allclose(x.norm(dim=1), torch.ones(n, dtype=x.dtype), atol=1e-10)
    c = x @ mu
    a = vmf.mean_resultant_length(kappa, d).item()
    # Var[mu.x] = 1 - A^2 - (d-1) A / kappa  (= A'(kappa)); 1/d at kappa = 0
    var = 1.0 / d if kappa == 0 else 1.0 - a * a - (d - 1) * a / kappa
    se = math.sqrt(var / n)
    assert abs(c.mean().item() - a) < 5 * se
    assert c.var().item() == pytest.approx(var, rel=0.06)


def test_batched_shapes_and_per_row_kappa():
    mus = torch.stack([_mu(32), -_mu(32)])
    kappas = torch.tensor([10.0, 500.0])
    x = vmf.sample(mus.float(), kappas, 5000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 5000, 32) and x.dtype == torch.float32
    for i in range(2):
        c = (x[i].double() @ mus[i]).mean().item()
        assert c == pytest.approx(vmf.mean_resultant_length(kappas[i].item(), 32).item(), abs=0.01)


def test_extreme_concentration_in_high_dimension():
    d, kappa = 4096, 1e6
    x = vmf.sample(_mu(d), kappa, 500, generator=torch.Generator().manual_seed(3))
    c = x @ _mu(d)
    a = vmf.mean_resultant_length(kappa, d).item()
    assert torch.isfinite(x).all()
    assert abs(c.mean().item() - a) < 1e-5


def test_determinism_with_generator():
    a = vmf.sample(_mu(8), 5.0, 10, generator=torch.Generator().manual_seed(11))
    b = vmf.sample(_mu(8), 5.0, 10, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)


def test_sample_validation():
    with pytest.raises(ConfigError):
        vmf.sample(_mu(4), -1.0, 3)
    with pytest.raises(ConfigError):
        vmf.sample(_mu(4), 1.0, 0)
    with pytest.raises(InvalidEmbeddingError):
        vmf.sample(torch.zeros(4), 1.0, 3)
    with pytest.raises(ConfigError):
        vmf.sample(torch.stack([_mu(4), _mu(4)]), torch.tensor([1.0, 2.0, 3.0]), 3)


@pytest.mark.parametrize("d,kappa", [(16, 50.0), (384, 1800.0)])
def test_estimate_kappa_recovers_concentration(d, kappa):
    x = vmf.sample(_mu(d), kappa, 20000, generator=torch.Generator().manual_seed(5))
    est = vmf.estimate_kappa(x).item()
    assert est == pytest.approx(kappa, rel=0.03)


def test_estimate_kappa_batched_and_float32():
    g = torch.Generator().manual_seed(2)
    x = vmf.sample(torch.stack([_mu(16), _mu(17)[:16] / _mu(17)[:16].norm()]).float(),
                   torch.tensor([20.0, 200.0]), 4000, generator=g)
    est = vmf.estimate_kappa(x)
    assert est.shape == (2,) and est.dtype == torch.float32
    assert est[0].item() == pytest.approx(20.0, rel=0.08)
    assert est[1].item() == pytest.approx(200.0, rel=0.08)
    with pytest.raises(InvalidEmbeddingError):
        vmf.estimate_kappa(torch.ones(1, 5))


def test_identical_vectors_have_capped_kappa():
    x = _mu(10).expand(5, 10)
    assert vmf.estimate_kappa(x).item() == pytest.approx(vmf.KAPPA_MAX, rel=1e-3)
