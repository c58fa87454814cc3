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
