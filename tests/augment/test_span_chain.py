"""The coupled rerun in span coordinates (``m2m.augment.span``) against today's kernel in d dimensions
(``langevin.coupled_full_chain``, kept as the reference): same law, also on rank-deficient spans."""

from __future__ import annotations

import math

import pytest
import torch

from m2m.augment.energy import component_log_weights, step_length
from m2m.augment.langevin import (
    coupled_full_chain,
    negligible_on_path,
    own_component_chain,
    path_terms,
)
from m2m.augment.span import span_coupled_chain
from m2m.geometry.noise import HostNoise
from m2m.geometry.span import span_frame

F64 = torch.float64


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().sort().values, b.double().sort().values
    both = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a, both, right=True).double() / a.numel()
    fb = torch.searchsorted(b, both, right=True).double() / b.numel()
    return (fa - fb).abs().max().item()


def _means(d: int, cos: list[float], duplicate: bool, seed: int = 0) -> torch.Tensor:
    """mu_0 and neighbours at the given cosines to it (random directions otherwise), optionally a
    duplicate of neighbour 1 and of mu_0 itself and an absent (zero) row."""
    g = torch.Generator().manual_seed(seed)
    mu0 = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=F64), dim=0)
    rows = [mu0]
    for c in cos:
        p = torch.randn(d, generator=g, dtype=F64)
        p = torch.nn.functional.normalize(p - (p @ mu0) * mu0, dim=0)
        rows.append(c * mu0 + math.sqrt(1 - c * c) * p)
    if duplicate:
        rows += [rows[1].clone(), mu0.clone(), torch.zeros(d, dtype=F64)]
    return torch.stack(rows).float()


def _run(kernel, mu: torch.Tensor, kappa: float, dt: float, steps: int, b: int, metropolis: bool, seed: int):
    k_comp, d = mu.shape
    m = mu.expand(b, k_comp, d).contiguous()
    present = m.norm(dim=2) > 0
    k = torch.where(present, torch.full((b, k_comp), kappa, dtype=F64), torch.zeros((), dtype=F64))
    log_w = component_log_weights(k, torch.ones(b, k_comp, dtype=F64), d, present)
    h = step_length(dt, k[:, :1], None, d, 1.0)
    own = own_component_chain(h, k[:, 0], steps, d, HostNoise.of(torch.Generator().manual_seed(seed)),
                              metropolis, record=True)
    x = m[:, 0].clone()
    out = kernel(x, m, k.float(), (log_w - log_w[:, :1]).float(), h, 1.0, torch.Generator().manual_seed(seed + 1),
                 own)
    return out, own, m, k, log_w


@pytest.mark.parametrize("metropolis", [False, True])
@pytest.mark.parametrize("duplicate", [False, True])
def test_span_kernel_has_the_law_of_the_full_kernel(metropolis, duplicate):
    d, b = 96, 6000
    mu = _means(d, [0.97, 0.9, 0.6], duplicate)
    kap, dt = 300.0, 0.3
    got, _, m, _, _ = _run(span_coupled_chain, mu, kap, dt, 5, b, metropolis, 1)
    want, _, _, _, _ = _run(coupled_full_chain, mu, kap, dt, 5, b, metropolis, 11)
    assert got.dtype == torch.float32 and torch.allclose(got.norm(dim=1), torch.ones(b), atol=1e-5)
    crit = 1.95 * math.sqrt(2 / b)  # KS at alpha = 1e-3, per statistic
    for j in range(4):              # the cosines to every distinct mean: what the energy reads
        assert _ks(got @ mu[j], want @ mu[j]) < crit, j
    # the part outside the means' span: its norm, and its direction is uniform there
    q, _ = torch.linalg.qr(mu[:4].double().T)
    out_g = got.double() - (got.double() @ q) @ q.T
    out_w = want.double() - (want.double() @ q) @ q.T
    assert _ks(out_g.norm(dim=1), out_w.norm(dim=1)) < crit
    probe = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=F64), dim=0)
    probe = probe - q @ (q.T @ probe)
    assert _ks(out_g @ probe, out_w @ probe) < crit


def test_span_kernel_is_the_one_component_chain_where_neighbours_are_negligible():
    # the coupling survives the change of coordinates: same recorded noise, same path where the
    # neighbour carries no weight (rows passing the path check), to float rounding
    d, b, c = 64, 2000, 0.66
    mu = _means(d, [c], False)
    got, own, m, k, log_w = _run(span_coupled_chain, mu, 400.0, 0.3, 5, b, False, 3)
    terms = path_terms(torch.full((b, 1), c, dtype=F64), k[:, 1:], log_w[:, 1:], k[:, 0], log_w[:, 0], 1.0)
    ok = negligible_on_path(own, *terms, d)
    assert 0.2 < ok.double().mean().item() < 0.8
    t = got.double() @ mu[0].double()
    assert torch.allclose(t[ok], own.t[ok], atol=1e-6)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_span_frame_reproduces_the_means_and_drops_duplicates(dtype):
    mu = _means(48, [0.99, 0.5], True).unsqueeze(0).to(dtype)  # 0, 1, 2, dup of 1, dup of 0, zero
    fr = span_frame(mu)
    assert fr.means.dtype == dtype                             # float32 means stay float32
    assert fr.kept[0].tolist() == [True, True, True, False, False, False]
    gram = mu[0].double() @ mu[0].double().T
    assert torch.allclose(fr.coords[0] @ fr.coords[0].T, gram, atol=1e-12)
    # combine / project_coords are q-frame maps: orthonormal on the kept slots (to the means' rounding)
    tol = 1e-12 if dtype == F64 else 1e-6
    a = torch.tensor([[0.3, -0.2, 0.5, 0.0, 0.0, 0.0]], dtype=F64)
    v = fr.combine(a)
    assert v.dtype == dtype
    assert torch.allclose(v.double().norm(), a.norm(), atol=tol)
    assert torch.allclose(fr.project_coords(v), a, atol=tol)
    assert torch.allclose(mu[0].double() @ v[0].double(), fr.coords[0] @ a[0], atol=tol)
    # the same through the float64 rows of a float32 frame
    v64 = fr.rows64(torch.tensor([0])).combine(a)
    assert v64.dtype == F64 and torch.allclose(mu[0].double() @ v64[0], fr.coords[0] @ a[0], atol=1e-12)


def test_float32_products_only_where_the_frame_is_well_conditioned():
    # a neighbour at cosine 0.9999 makes the inverse factor large: that row's products run in float64
    # (``wide``); a row of well-separated means runs in float32; both give the float64 end point
    from m2m.augment.span import _end_point, _materialise

    d = 64
    close, apart = _means(d, [0.9999, 0.5], False), _means(d, [0.5, 0.3], False, seed=1)
    mu = torch.stack([close, apart])
    fr = span_frame(mu)
    assert fr.wide is not None and fr.wide.tolist() == [0]
    g = torch.Generator().manual_seed(0)
    xc = torch.nn.functional.normalize(torch.randn(2, 3 + 1 + 2, generator=g, dtype=F64), dim=1)

    class _Fixed:
        def __init__(self) -> None:
            self.g = torch.randn(2, d, generator=g)

        def gaussian(self, shape, dtype):
            return self.g.to(dtype)

    draws = _Fixed()
    got = _materialise(fr, xc, draws, F64)
    want = _end_point(span_frame(mu.double()), xc, draws.g.double())
    assert torch.equal(got[0], want[0])                          # the wide row: float64 throughout
    assert (got[1] - want[1]).abs().max().item() < 1e-6          # the float32 row: float32 rounding


def test_span_kernel_falls_back_when_d_is_small():
    mu = _means(8, [0.9, 0.8, 0.7, 0.6], False)
    got, _, _, _, _ = _run(span_coupled_chain, mu, 50.0, 0.3, 5, 50, False, 1)
    assert torch.allclose(got.norm(dim=1), torch.ones(50), atol=1e-5)


@pytest.mark.parametrize("metropolis", [False, True])
def test_span_loop_numpy_and_torch_agree(metropolis):
    # the CPU runs the loop in numpy, other devices in torch: same arithmetic on the same draws
    import numpy as np

    from m2m.augment.span import _span_loop

    b, steps, d = 40, 3, 48
    mu = _means(d, [0.97, 0.9], True)
    k = mu.shape[0]
    coords = span_frame(mu.unsqueeze(0).expand(b, k, d).contiguous()).coords.numpy()
    means = np.zeros((b, k, k + 1 + steps))
    means[:, :, :k] = coords
    rng = np.random.default_rng(0)
    kap = np.where(np.linalg.norm(mu.numpy(), axis=1) > 0, 300.0, 0.0)[None].repeat(b, 0)
    lw = np.where(kap > 0, rng.normal(size=(b, k)), -np.inf)
    lw[:, 0] = 0.0
    hh = np.full((b, 1), 0.3 / 300.0)
    z, chi2, x1 = rng.normal(size=(steps, 2, b)), rng.chisquare(d - 2, (steps, b)), rng.normal(size=(steps, b))
    acc = rng.random((steps, b)) < 0.8
    log_u = np.log(rng.random((steps, b))) if metropolis else None
    recorded: list[np.ndarray] = []

    def record(draw):
        def fn(arg):
            recorded.append(draw(arg))
            return recorded[-1]
        return fn

    out_np = _span_loop(np, lambda a: np.amax(a, axis=1), means, kap, lw, hh, 1.0, z, chi2, x1, acc, log_u,
                        record(lambda shape: rng.normal(size=shape)), record(lambda dfs: np.stack([rng.chisquare(df, b) for df in dfs])), d)
    replay = iter(recorded)
    t = torch.from_numpy
    out_t = _span_loop(torch, lambda a: torch.amax(a, dim=1), t(means), t(kap), t(lw), t(hh), 1.0, t(z), t(chi2),
                       t(x1), t(acc), None if log_u is None else t(log_u), lambda s: t(next(replay)),
                       lambda dfs: t(next(replay)), d)
    assert np.allclose(out_t.numpy(), out_np, atol=1e-12)
    assert np.allclose(np.linalg.norm(out_np, axis=1), 1.0)


@pytest.mark.parametrize("metropolis", [False, True])
def test_float32_means_give_the_float64_kernels_rows(metropolis):
    # the same chain and draws with the means in float32 (products in float32 where the frame allows)
    # and in float64: the rows agree to float32 rounding, and the frames here do take the float32 path
    d, b = 96, 400
    mu = _means(d, [0.97, 0.9, 0.6], False)
    m = mu.expand(b, *mu.shape).contiguous()
    assert bool(span_frame(m).wide.numel() == 0)
    k = torch.full((b, mu.shape[0]), 300.0, dtype=F64)
    log_w = component_log_weights(k, torch.ones_like(k), d)
    h = step_length(0.3, k[:, :1], None, d, 1.0)
    own = own_component_chain(h, k[:, 0], 5, d, HostNoise.of(torch.Generator().manual_seed(0)), metropolis,
                              record=True)
    args = (k.float(), (log_w - log_w[:, :1]).float(), h, 1.0)
    got = span_coupled_chain(m[:, 0].clone(), m, *args, HostNoise.of(torch.Generator().manual_seed(1)), own)
    want = span_coupled_chain(m[:, 0].clone(), m.double(), *args, HostNoise.of(torch.Generator().manual_seed(1)), own)
    assert not torch.equal(got, m[:, 0])
    assert (got - want).abs().max().item() < 1e-6


def test_exact_bmm_forms_the_products_elementwise_where_tf32_could_round_them(monkeypatch):
    # the branch a CUDA float32 product takes under set_float32_matmul_precision("high"): the same
    # products as bmm, for both shapes the chain uses ([B, 1, d] x [B, d, K] and [B, 1, K] x [B, K, d])
    import m2m.geometry.span as span_mod

    g = torch.Generator().manual_seed(0)
    a, m = torch.randn(7, 1, 48, generator=g), torch.randn(7, 5, 48, generator=g)
    want1, want2 = torch.bmm(a.double(), m.double().transpose(1, 2)), torch.bmm(a[:, :, :5].double(), m.double())

    class _Dev:
        type = "cuda"

    class _T:
        def __init__(self, t: torch.Tensor) -> None:
            self.t, self.device, self.dtype = t, _Dev(), t.dtype

        def unsqueeze(self, i: int) -> torch.Tensor:
            return self.t.unsqueeze(i)

    monkeypatch.setattr(span_mod, "_tf32_possible", lambda: True)
    got1 = span_mod.exact_bmm(_T(a), _T(m.transpose(1, 2)))
    got2 = span_mod.exact_bmm(_T(a[:, :, :5]), _T(m))
    assert torch.allclose(got1.double(), want1, atol=1e-5) and torch.allclose(got2.double(), want2, atol=1e-5)
    out = torch.empty(7, 1, 5)
    assert span_mod.exact_bmm(_T(a), _T(m.transpose(1, 2)), out=out) is out
