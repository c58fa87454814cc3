"""The mixture energy: gradient against autograd, weights, masks, step length and validation."""

from __future__ import annotations

import math

import pytest
import torch

from m2m.augment.energy import (
    component_log_weights,
    kappa_ref,
    log_density_and_gradient,
    step_length,
    validate_chain_args,
)
from m2m.errors import ConfigError
from m2m.geometry.vmf import log_normalizer


def test_gradient_matches_autograd():
    g = torch.Generator().manual_seed(0)
    b, k, d, temp = 5, 3, 7, 1.7
    mu = torch.nn.functional.normalize(torch.randn(b, k, d, generator=g, dtype=torch.float64), dim=-1)
    kappa = torch.rand(b, k, generator=g, dtype=torch.float64) * 50
    alpha = torch.rand(b, k, generator=g, dtype=torch.float64) + 0.1
    log_w = component_log_weights(kappa, alpha, d)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    logp, grad = log_density_and_gradient(x, mu, kappa, log_w, temp)
    dens = (alpha * torch.exp(log_normalizer(kappa, d)) * torch.exp(kappa * (mu @ x.unsqueeze(-1)).squeeze(-1))).sum(1)
    ref = torch.log(dens) / temp
    assert torch.allclose(logp, ref.detach())
    (auto,) = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(grad, auto)


def test_masked_components_carry_no_weight():
    kappa = torch.tensor([[10.0, 20.0]], dtype=torch.float64)
    alpha = torch.ones(1, 2, dtype=torch.float64)
    mask = torch.tensor([[True, False]])
    a = component_log_weights(kappa, alpha, 5, mask)
    assert math.isfinite(a[0, 0].item()) and a[0, 1].item() == -math.inf
    mu = torch.eye(5, dtype=torch.float64)[:2].unsqueeze(0)
    x = torch.eye(5, dtype=torch.float64)[1:2]
    _, grad = log_density_and_gradient(x, mu, kappa, a, 1.0)
    assert torch.allclose(grad, 10.0 * mu[:, 0])


def test_step_length_is_relative_to_the_largest_effective_kappa():
    kappa = torch.tensor([[100.0, 400.0], [0.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, True]])
    assert kappa_ref(kappa, mask, 10, 1.0).tolist() == [400.0, 9.0]
    assert kappa_ref(kappa, mask, 10, 2.0).tolist() == [200.0, 9.0]
    masked = torch.tensor([[True, False], [True, True]])
    assert step_length(0.5, kappa, masked, 10, 1.0).tolist() == [0.005, 0.5 / 9]


@pytest.mark.parametrize("steps,step_size,temp", [(-1, 0.1, 1.0), (1.5, 0.1, 1.0), (3, 0.0, 1.0), (3, 1.5, 1.0),
                                                  (3, 0.1, 0.0), (3, 0.1, float("inf")), (True, 0.1, 1.0)])
def test_chain_argument_validation(steps, step_size, temp):
    with pytest.raises(ConfigError):
        validate_chain_args(steps, step_size, temp)
