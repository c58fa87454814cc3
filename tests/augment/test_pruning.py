"""Soundness of dropping negligible components: the static bound, the path check and the coupled rerun."""

from __future__ import annotations

import math

import pytest
import torch

from m2m import langevin
from m2m.augment.energy import component_log_weights, step_length
from m2m.augment.langevin import (
    PRUNE_EPS,
    _chi2_upper_bound,
    coupled_full_chain,
    negligible_neighbours,
    negligible_on_path,
    own_component_chain,
    path_terms,
)
from m2m.augment.span import span_coupled_chain
from m2m.geometry.vmf import log_normalizer

F64 = torch.float64


def _pair(d: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    mu0 = torch.zeros(d, dtype=F64)
    mu0[0] = 1.0
    mu1 = torch.zeros(d, dtype=F64)
    mu1[0], mu1[1] = c, math.sqrt(1 - c * c)
    return mu0, mu1


def _static(c: torch.Tensor, kappa: float, d: int, h: float, steps: int) -> torch.Tensor:
    n = c.numel()
    lw = float(log_normalizer(kappa, d))
    full = lambda v: torch.full((n,), v, dtype=F64)  # noqa: E731
    return negligible_neighbours(c.reshape(n, 1), full(kappa).unsqueeze(1), full(lw).unsqueeze(1), full(kappa),
                                 full(lw), full(h), steps, d, 1.0)


def test_chi2_bound_is_an_upper_tail_bound():
    stats = pytest.importorskip("scipy.stats")
    for df, p in [(1, 1e-3), (4, 1e-12), (19, 1e-13)]:
        q = _chi2_upper_bound(df, p)
        assert stats.chi2.sf(q, df) <= p
        assert q < 1.7 * stats.chi2.isf(p, df)          # and not absurdly loose


def test_static_bound_holds_along_exact_chains_at_its_boundary():
    d, kappa, dt, steps, b = 256, 2000.0, 0.06, 5, 3000
    cs = torch.linspace(0.5, 0.999, 500, dtype=F64)
    ok = _static(cs, kappa, d, dt / kappa, steps)
    assert ok[0] and not ok[-1]
    c = cs[ok].max().item()
    mu0, mu1 = _pair(d, c)
    mu = torch.stack([mu0, mu1]).expand(b, 2, d).contiguous()
    k = torch.full((b, 2), kappa, dtype=F64)
    a = torch.ones(b, 2, dtype=F64)
    x = mu0.expand(b, d).clone()
    g = torch.Generator().manual_seed(0)
    worst = -math.inf
    for _ in range(steps):                                   # the points whose weights drive the chain
        worst = max(worst, (kappa * (x @ mu1 - x @ mu0)).max().item())
        x = langevin.sample(x, mu, k, a, 1, dt, generator=g)
    assert worst < math.log(PRUNE_EPS)


def _recorded(d: int, c: float, kappa: float, dt: float, steps: int, b: int, metropolis: bool,
              kernel=coupled_full_chain):
    mu0, mu1 = _pair(d, c)
    mu = torch.stack([mu0, mu1]).expand(b, 2, d).contiguous()
    k = torch.full((b, 2), kappa, dtype=F64)
    log_w = component_log_weights(k, torch.ones(b, 2, dtype=F64), d)
    h = step_length(dt, k, None, d, 1.0)
    own = own_component_chain(h, k[:, 0], steps, d, torch.Generator().manual_seed(1), metropolis, record=True)
    exact = kernel(mu0.expand(b, d).clone(), mu, k, log_w - log_w[:, :1], h, 1.0,
                               torch.Generator().manual_seed(2), own)
    terms = path_terms(torch.full((b, 1), c, dtype=F64), k[:, 1:], log_w[:, 1:], k[:, 0], log_w[:, 0], 1.0)
    ok = negligible_on_path(own, *terms, d)
    return own, exact, ok, mu0


@pytest.mark.parametrize("kernel", [coupled_full_chain, span_coupled_chain])
@pytest.mark.parametrize("metropolis", [False, True])
def test_coupled_rerun_is_the_one_component_chain_where_neighbours_are_negligible(metropolis, kernel):
    own, exact, ok, mu0 = _recorded(32, 0.67, 400.0, 0.3, 5, 2000, metropolis, kernel)
    assert 0.2 < ok.double().mean().item() < 0.8              # a borderline case: both outcomes occur
    t = exact @ mu0
    rho = torch.sqrt(torch.clamp(1 - t * t, min=0))
    assert torch.allclose(t[ok], own.t[ok], atol=1e-9)        # the coupling: same noise, same chain
    assert torch.allclose(rho[ok], own.rho[ok], atol=1e-7)
    assert torch.allclose(exact.norm(dim=1), torch.ones(len(t), dtype=F64))


@pytest.mark.parametrize("kernel", [coupled_full_chain, span_coupled_chain])
def test_coupled_rerun_departs_where_the_neighbour_pulls(kernel):
    own, exact, ok, mu0 = _recorded(32, 0.995, 400.0, 0.3, 5, 500, False, kernel)
    assert not ok.any()
    assert ((exact @ mu0) - own.t).abs().max().item() > 1e-3
