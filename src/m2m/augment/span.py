"""``coupled_full_chain`` run in the span of the row's means: the same law in K + S + 1 coordinates.

The energy depends on x only through mu_j . x, and the chain starts at mu_0, so every point it visits
lies in span(mu) plus the span of the noise directions it has used. With an orthonormal frame of
span(mu) (``m2m.geometry.span``) the coupled chain's noise z0 mu_0 + z1 w_s + sqrt(chi2_s) r_s is
tracked exactly in coordinates: a fresh Gaussian in d dimensions is its coordinates on the directions
tracked so far (N(0, 1) each) plus its remaining norm (a chi^2 with the remaining degrees of freedom)
along one new direction, orthogonal to all tracked ones and uniform in their complement, independent
of everything drawn. So w_0 and each r_s add one coordinate: K (frame) + 1 (w_0) + S (r_s). The
directions outside span(mu) (and the frame slots of dropped, duplicate means) form a Haar-random
orthonormal frame of span(mu)'s complement, independent of the coordinates, so the end point's part
there is its norm times one uniform direction of that complement, drawn once at the end. The MALA
ratio uses only dot products and norms, which the frame preserves. Cost per row: the Gram matrix
(K^2 d), O(S K^2) for the chain, and O(K d) for the end point, against O(S K d) for the chain in d
plus S Gaussians of d numbers. See docs/geometry.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from m2m.augment.energy import log_density_and_gradient
from m2m.augment.langevin import OwnChain, _Buffers, _step, coupled_full_chain
from m2m.geometry.noise import HostNoise, Source, normal_
from m2m.geometry.span import SpanFrame, span_frame
from m2m.geometry.vmf import standard_gamma

__all__ = ["span_coupled_chain"]


class _Draws:
    """Float64 Gaussian and chi^2 draws from one source (numpy stream on the CPU, torch elsewhere)."""

    def __init__(self, generator: Source, device: torch.device) -> None:
        self.device = device
        self.host = HostNoise.of(generator) if device.type == "cpu" else None
        gen = generator
        if self.host is None and isinstance(generator, HostNoise):
            gen = generator.torch_generator(device)
        self.gen = gen if isinstance(gen, torch.Generator) or gen is None else None

    def normal(self, shape: tuple[int, ...]) -> Tensor:
        if self.host is not None:
            return torch.from_numpy(self.host.standard_normal(shape))
        return torch.randn(shape, dtype=torch.float64, device=self.device, generator=self.gen)

    def gaussian(self, shape: tuple[int, ...]) -> Tensor:
        """Float64 N(0, 1) draws of a large shape (float32 Box-Muller on the CPU, cast)."""
        if self.host is not None:
            return normal_(torch.empty(shape, dtype=torch.float32), self.host).to(torch.float64)
        return torch.randn(shape, dtype=torch.float64, device=self.device, generator=self.gen)

    def chi2(self, df: int, n: int) -> Tensor:
        if self.host is not None:
            return torch.from_numpy(2.0 * self.host.standard_gamma(df / 2.0, (n,)))
        return 2.0 * standard_gamma(df / 2.0, (n,), self.gen, self.device, torch.float64)


def span_coupled_chain(x: Tensor, mu: Tensor, kappa: Tensor, log_w: Tensor, h: Tensor, temperature: float,
                       generator: Source, own: OwnChain) -> Tensor:
    """``coupled_full_chain`` (same arguments, same law) run in span coordinates; [B, d] in x's dtype.

    x [B, d] are the start points mu_0 = mu[:, 0]; mu [B, K, d] (absent components may be zero
    rows); kappa, log_w [B, K]; h [B]; ``own`` the recorded one-component run of these rows. Falls
    back to ``coupled_full_chain`` when d is too small for the tracked coordinates (d <= K + S + 1).
    """
    assert own.z is not None and own.chi2 is not None and own.x1 is not None and own.acc is not None
    steps = own.z.shape[0]
    b, k, d = mu.shape
    if steps == 0 or b == 0:
        return x.clone()
    width = k + 1 + steps                      # frame (k) + w_0 (1) + one per step
    if d <= width:
        return coupled_full_chain(x, mu, kappa, log_w, h, temperature,
                                  generator if not isinstance(generator, HostNoise) else None, own)
    f64 = torch.float64
    dev = x.device
    frame = span_frame(mu)
    means = torch.zeros((b, k, width), dtype=f64, device=dev)
    means[:, :, :k] = frame.coords
    draws = _Draws(generator, dev)
    # w_0: uniform tangent direction at mu_0 (= frame slot 0): a Gaussian on the k frame slots, its
    # remaining norm on slot k, the part along slot 0 removed
    w = torch.zeros((b, width), dtype=f64, device=dev)
    w[:, 1:k] = draws.normal((b, k - 1)).to(dev)
    w[:, k] = torch.sqrt(draws.chi2(d - k, b)).to(dev)
    w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
    xc = torch.zeros((b, width), dtype=f64, device=dev)
    xc[:, 0] = 1.0
    e0 = xc.clone()
    kap, lw = kappa.to(f64), log_w.to(f64)
    hh = h.to(f64).unsqueeze(1)
    sq_rest = torch.sqrt(2.0 * h.to(f64).unsqueeze(1) * own.chi2.T.to(f64))       # [B, S]
    bufs = _Buffers(xc)
    logp, grad = log_density_and_gradient(xc, means, kap, lw, temperature, grad_out=bufs.grad)
    tiny = torch.finfo(f64).tiny
    for i in range(steps):
        used = k + 1 + i                      # coordinates tracked before this step's new direction
        g = torch.zeros((b, width), dtype=f64, device=dev)
        g[:, :used] = draws.normal((b, used)).to(dev)
        g[:, used] = torch.sqrt(draws.chi2(d - used, b)).to(dev)
        r = g - g[:, :1] * e0 - torch.linalg.vecdot(g, w).unsqueeze(1) * w
        rn = torch.linalg.vector_norm(r, dim=1, keepdim=True)
        r = torch.where(rn > 0, r / torch.clamp(rn, min=tiny), torch.zeros_like(r))
        chi = torch.sqrt(own.chi2[i].to(f64)).unsqueeze(1)
        noise = own.z[i, 0].to(f64).unsqueeze(1) * e0 + own.z[i, 1].to(f64).unsqueeze(1) * w + chi * r
        log_u = None if own.log_u is None else own.log_u[i].to(f64)
        xc, logp, grad = _step(xc, logp, grad, noise, log_u, means, kap, lw, hh, temperature, bufs,
                               last=i == steps - 1)
        nw = own.x1[i].to(f64).unsqueeze(1) * w + sq_rest[:, i:i + 1] * r
        nn = torch.linalg.vector_norm(nw, dim=1, keepdim=True)
        moved = own.acc[i].unsqueeze(1) & (nn > 0)
        w = torch.where(moved, nw / torch.clamp(nn, min=tiny), w)
    return _materialise(frame, xc, draws, x.dtype)


def _materialise(frame: SpanFrame, xc: Tensor, draws: _Draws, dtype: torch.dtype) -> Tensor:
    """The point whose coordinates on the kept frame slots are xc's, and whose part outside span(mu)
    has the norm of xc's other coordinates along one uniform direction of that complement (a Gaussian
    with its span part removed)."""
    b, k = frame.kept.shape
    d = frame.means.shape[2]
    zero = torch.zeros((), dtype=xc.dtype, device=xc.device)
    inside = torch.where(frame.kept, xc[:, :k], zero)
    outside = torch.sqrt((torch.where(frame.kept, zero, xc[:, :k]) ** 2).sum(1) + (xc[:, k:] ** 2).sum(1))
    g = draws.gaussian((b, d))
    gk = frame.project_coords(g)
    # |g - P g|^2 = |g|^2 - |P g|^2 (the kept slots are orthonormal); ~d against ~k: no cancellation
    perp = torch.sqrt(torch.clamp((g * g).sum(1) - (gk * gk).sum(1), min=0.0))
    scale = torch.where(perp > 0, outside / torch.clamp(perp, min=torch.finfo(xc.dtype).tiny), zero)
    out = frame.combine(inside - scale.unsqueeze(1) * gk).addcmul_(g, scale.unsqueeze(1))
    out = out / torch.linalg.vector_norm(out, dim=1, keepdim=True)
    return out.to(dtype)
