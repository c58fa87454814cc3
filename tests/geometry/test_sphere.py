"""Sphere maps: unit outputs, tangency, retractions, and the law of random_point_at_cosine."""

from __future__ import annotations

import pytest
import torch

from m2m.errors import InvalidEmbeddingError
from m2m.geometry import sphere


def _unit(n: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sphere.normalize(torch.randn(n, d, generator=g, dtype=dtype))


def test_normalize_and_zero_rows():
    x = _unit(5, 7)
    assert torch.allclose(x.norm(dim=1), torch.ones(5, dtype=x.dtype))
    with pytest.raises(InvalidEmbeddingError):
        sphere.normalize(torch.zeros(2, 3))


def test_tangent_projection_is_orthogonal_and_idempotent():
    x = _unit(8, 5)
    v = torch.randn(8, 5, dtype=x.dtype)
    p = sphere.project_tangent(x, v)
    assert (p * x).sum(1).abs().max() < 1e-12
    assert torch.allclose(sphere.project_tangent(x, p), p)


@pytest.mark.parametrize("retraction", [sphere.retract, sphere.exp_map])
def test_retractions_stay_on_sphere_and_fix_zero(retraction):
    x = _unit(6, 4)
    v = sphere.project_tangent(x, torch.randn(6, 4, dtype=x.dtype))
    y = retraction(x, v)
    assert torch.allclose(y.norm(dim=1), torch.ones(6, dtype=x.dtype))
    assert torch.allclose(retraction(x, torch.zeros_like(v)), x)


def test_exp_map_moves_by_the_tangent_length():
    x = _unit(6, 4)
    v = sphere.project_tangent(x, torch.randn(6, 4, dtype=x.dtype))
    v = 0.7 * v / v.norm(dim=1, keepdim=True)
    y = sphere.exp_map(x, v)
    assert torch.allclose(torch.acos((x * y).sum(1)), torch.full((6,), 0.7, dtype=x.dtype))


def test_retract_is_gnomonic():
    x = _unit(6, 4)
    v = sphere.project_tangent(x, torch.randn(6, 4, dtype=x.dtype))
    y = sphere.retract(x, v)
    # x . R_x(v) = 1 / |x + v|, the tangent vector is recovered as y / (x.y) - x
    c = (x * y).sum(1, keepdim=True)
    assert torch.allclose(y / c - x, v)


@pytest.mark.parametrize("d,dtype,layout", [(3, torch.float64, "contiguous"), (200, torch.float64, "contiguous"),
                                            (200, torch.float32, "contiguous"), (200, torch.float32, "expanded")])
def test_random_point_at_cosine(d, dtype, layout):
    # float32 contiguous rows take the numpy path (HostNoise draws, numpy row dots); expanded rows torch's
    mu = _unit(1, d).to(dtype).expand(4000, d)
    if layout == "contiguous":
        mu = mu.contiguous()
    cos = torch.full((4000,), 0.6, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = sphere.random_point_at_cosine(mu, cos, generator=g)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert x.dtype == dtype
    assert torch.allclose(x.norm(dim=1), torch.ones(4000, dtype=x.dtype), atol=tol)
    assert torch.allclose((x @ mu[0]).double(), cos, atol=tol)
    x, mu, cos = x.double(), mu.double(), cos.double()
    # orthogonal part is isotropic: its mean is ~0 and its second moment is (1-c^2)/(d-1) I
    perp = x - cos.unsqueeze(1) * mu
    assert perp.mean(0).abs().max() < 5 * 0.8 / (4000 * max(d - 1, 1)) ** 0.5 + 0.02
    second = (perp.T @ perp) / 4000
    proj = torch.eye(d, dtype=x.dtype) - torch.outer(mu[0], mu[0])
    assert torch.allclose(second, proj * 0.64 / (d - 1), atol=0.05 if d == 3 else 0.002)


@pytest.mark.parametrize("d", [128, 384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_point_at_cosine_is_the_same_on_one_or_more_torch_threads(d, dtype):
    # on the CPU the combination runs in torch on a one-thread caller and in numpy otherwise (torch's
    # passes would spread over the intra-op threads): the same three IEEE operations, the same bits
    g = torch.Generator().manual_seed(3)
    mu = sphere.normalize(torch.randn(257, d, generator=g, dtype=dtype))
    cos = torch.rand(257, generator=g, dtype=dtype) * 2 - 1
    gauss = torch.randn(257, d, generator=g, dtype=dtype)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(sphere.random_point_at_cosine(mu, cos, gaussian=gauss.clone()))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose((outs[0] * mu).sum(1), cos, atol=1e-5)


@pytest.mark.parametrize("d", [32, 384])
def test_random_point_at_cosine_ignores_a_scratch_that_is_an_input(d):
    g = torch.Generator().manual_seed(5)
    mu = sphere.normalize(torch.randn(40, d, generator=g))
    cos = torch.rand(40, generator=g) * 2 - 1
    gauss = torch.randn(40, d, generator=g)
    ref = sphere.random_point_at_cosine(mu, cos, gaussian=gauss.clone())
    z = gauss.clone()
    assert torch.equal(sphere.random_point_at_cosine(mu, cos, gaussian=z, scratch=z), ref)
    m = mu.clone()
    assert torch.equal(sphere.random_point_at_cosine(m, cos, gaussian=gauss.clone(), scratch=m), ref)
    assert torch.equal(m, mu)
