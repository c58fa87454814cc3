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

from typing import Any

import numpy as np
import torch
from torch import Tensor

from m2m.augment.langevin import OwnChain, coupled_full_chain
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
                       generator: Source, own: OwnChain, factor: tuple[Tensor, Tensor] | None = None) -> Tensor:
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
    frame = span_frame(mu, factor=factor)
    draws = _Draws(generator, dev)
    cpu = dev.type == "cpu"
    # the loop is arithmetic on [B, K + S + 1] arrays: numpy on the CPU (a fraction of torch's
    # per-operation cost, and no intra-op threads), torch elsewhere
    xp: Any = np if cpu else torch
    conv = (lambda t: t.to(f64).numpy()) if cpu else (lambda t: t.to(f64))
    amax = (lambda a: np.amax(a, axis=1)) if cpu else (lambda a: torch.amax(a, dim=1))
    means = xp.zeros((b, k, width), dtype=np.float64 if cpu else f64, **({} if cpu else {"device": dev}))
    means[:, :, :k] = conv(frame.coords)
    kap, lw = conv(kappa), conv(log_w)
    hh = conv(h)[:, None]
    z, chi2, x1 = conv(own.z), conv(own.chi2), conv(own.x1)
    acc_rec = own.acc.numpy() if cpu else own.acc
    log_u = None if own.log_u is None else conv(own.log_u)
    normal = (lambda shape: draws.normal(shape).numpy()) if cpu else draws.normal
    chi2_draw = (lambda df: draws.chi2(df, b).numpy()) if cpu else (lambda df: draws.chi2(df, b))
    xc = _span_loop(xp, amax, means, kap, lw, hh, temperature, z, chi2, x1, acc_rec, log_u, normal, chi2_draw, d)
    return _materialise(frame, torch.from_numpy(xc) if cpu else xc, draws, x.dtype)


def _span_loop(xp: Any, amax: Any, means: Any, kap: Any, lw: Any, hh: Any, temperature: float, z: Any, chi2: Any,
               x1: Any, acc_rec: Any, log_u: Any, normal: Any, chi2_draw: Any, d: int) -> Any:
    """The coupled chain's steps in span coordinates on numpy arrays or torch tensors (float64):
    the arithmetic of ``langevin._step`` on [B, W] coordinates. Returns the end point's coordinates."""
    b, k, width = means.shape
    steps = z.shape[0]

    def col(v: Any) -> Any:
        return v[:, None]

    def dot(a: Any, c: Any) -> Any:
        return (a * c).sum(1)

    def unit(v: Any) -> Any:
        n = xp.sqrt(dot(v, v))
        return xp.where(col(n > 0), v / col(xp.where(n > 0, n, 1.0)), 0.0 * v)

    def density(y: Any) -> tuple[Any, Any]:
        s = (means @ y[:, :, None])[:, :, 0]                        # mu_j . y
        logits = lw + kap * s
        top = amax(logits)
        e = xp.exp(logits - col(top))
        tot = e.sum(1)
        coef = e / col(tot) * kap / temperature
        return (top + xp.log(tot)) / temperature, (coef[:, None, :] @ means)[:, 0, :]

    # w_0: uniform tangent direction at mu_0 (= frame slot 0): a Gaussian on the k frame slots, its
    # remaining norm on slot k, the part along slot 0 removed
    w = 0.0 * means[:, 0, :]
    w[:, 1:k] = normal((b, k - 1))
    w[:, k] = xp.sqrt(chi2_draw(d - k))
    w = unit(w)
    xc = 0.0 * w
    xc[:, 0] = 1.0
    sq = xp.sqrt(2.0 * hh)
    sq_rest = xp.sqrt(2.0 * hh * chi2.T)                             # [B, S]
    logp, grad = density(xc)
    for i in range(steps):
        used = k + 1 + i                      # coordinates tracked before this step's new direction
        g = 0.0 * w
        g[:, :used] = normal((b, used))
        g[:, used] = xp.sqrt(chi2_draw(d - used))
        g[:, 0] = 0.0                                               # off mu_0 (slot 0) ...
        r = unit(g - col(dot(g, w)) * w)                            # ... and off w
        noise = xp.sqrt(col(chi2[i])) * r + col(z[i, 1]) * w
        noise[:, 0] += z[i, 0]
        # one step of langevin._step: v = sqrt(2h) P_x xi + h P_x grad, retracted
        xz, xg = col(dot(xc, noise)), col(dot(xc, grad))
        v = sq * (noise - xc * xz) + hh * (grad - xc * xg)
        y = xc + v
        y = y / col(xp.sqrt(dot(y, y)))
        last = i == steps - 1
        if log_u is None:
            xc = y
            if not last:
                logp, grad = density(y)
        else:
            fwd = 2.0 * hh[:, 0] * (dot(noise, noise) - xz[:, 0] ** 2)
            logp_y, grad_y = density(y)
            c = col(dot(xc, y))
            yg = col(dot(y, grad_y))
            rev_vec = xc / c - y - hh * (grad_y - y * yg)
            rev = dot(rev_vec, rev_vec)
            acc = log_u[i] < logp_y - logp - (rev - fwd) / (4.0 * hh[:, 0])
            xc = xp.where(col(acc), y, xc)
            grad = xp.where(col(acc), grad_y, grad)
            logp = xp.where(acc, logp_y, logp)
        nw = col(x1[i]) * w + sq_rest[:, i:i + 1] * r
        nn = xp.sqrt(dot(nw, nw))
        moved = acc_rec[i] & (nn > 0)
        w = xp.where(col(moved), nw / col(xp.where(nn > 0, nn, 1.0)), w)
    return xc


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
