"""The samplers and hooks on a CUDA device (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m import langevin, vmf
from m2m.augment.augmenter import LangevinAugmenter, VMFAugmenter

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_vmf_sample_on_cuda():
    mu = torch.nn.functional.normalize(torch.randn(4, 64, device="cuda"), dim=1)
    x = vmf.sample(mu, torch.full((4,), 200.0, device="cuda"), 3000,
                   generator=torch.Generator(device="cuda").manual_seed(0))
    assert x.device.type == "cuda" and x.shape == (4, 3000, 64)
    c = (x * mu.unsqueeze(1)).sum(-1).mean().item()
    assert c == pytest.approx(vmf.mean_resultant_length(200.0, 64).item(), abs=0.01)


def test_langevin_sample_on_cuda():
    b, d = 512, 32
    mu0 = torch.nn.functional.normalize(torch.randn(d, device="cuda"), dim=0)
    x = langevin.sample(mu0.expand(b, d), mu0.expand(b, 1, d), torch.full((b, 1), 50.0, device="cuda"),
                        torch.ones(b, 1, device="cuda"), 100, 0.5, metropolis=True,
                        generator=torch.Generator(device="cuda").manual_seed(1))
    assert x.device.type == "cuda"
    assert (x @ mu0).mean().item() == pytest.approx(vmf.mean_resultant_length(50.0, d).item(), abs=0.02)


def test_augmenters_on_cuda():
    n, d = 256, 64
    mu = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1)
    nb = np.random.default_rng(0).integers(0, n, (n, 8)).astype(np.int64)
    kappa, alpha = np.full(n, 500.0, np.float32), np.ones(n, np.float32)
    rows = torch.arange(n, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(2)
    gather = lambda p: mu.index_select(0, p.to("cuda"))  # noqa: E731
    for aug in (LangevinAugmenter(nb, kappa, alpha, step_size=0.3), VMFAugmenter(kappa)):
        y = aug(mu, rows, gather, gen)
        assert y.device.type == "cuda" and y.shape == mu.shape
        assert torch.allclose(y.norm(dim=1), torch.ones(n, device="cuda"), atol=1e-5)


def test_langevin_products_keep_float32_precision_when_a_script_allows_tf32():
    # torch.set_float32_matmul_precision("high") (common in training scripts) makes a float32 bmm TF32
    # on Ampere and later: the chain's products, the neighbour cosines and the span frame must not move
    from m2m.augment.energy import log_density_and_gradient
    from m2m.geometry.span import exact_bmm

    g = torch.Generator(device="cuda").manual_seed(3)
    b, k, d = 64, 17, 640
    mu = torch.nn.functional.normalize(torch.randn(b, k, d, device="cuda", generator=g), dim=2)
    x = torch.nn.functional.normalize(mu[:, 0] + 0.05 * torch.randn(b, d, device="cuda", generator=g), dim=1)
    kap = torch.full((b, k), 3000.0, device="cuda")
    log_w = torch.zeros(b, k, device="cuda")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        got = exact_bmm(mu, x.unsqueeze(2))
        lp, grad = log_density_and_gradient(x, mu, kap, log_w, 1.0)
    finally:
        torch.set_float32_matmul_precision(before)
    want = torch.bmm(mu.double(), x.double().unsqueeze(2))
    assert (got.double() - want).abs().max().item() < 1e-5
    lp64, grad64 = log_density_and_gradient(x.double(), mu.double(), kap.double(), log_w.double(), 1.0)
    assert ((grad.double() - grad64).abs().max() / grad64.abs().max()).item() < 1e-5
    assert (lp.double() - lp64).abs().max().item() < 1e-2        # log p ~ kappa: float32 rounding of 3000
