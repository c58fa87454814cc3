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
from m2m.errors import ConfigError
from m2m.geometry.noise import HostNoise, Source, normal_
from m2m.geometry.span import SpanFactor, SpanFrame, span_frame
from m2m.geometry.vmf import standard_gamma

__all__ = ["RowBlocks", "span_coupled_chain"]


class RowBlocks:
    """The rows of several batches in one ``span_coupled_chain`` call, each block of ``n`` rows drawing
    from its own ``source`` (``[(source, n), ...]``, in row order). A block's draws are those a call
    over that block alone makes, in the same order, and the chain's arithmetic is row by row, so a
    row's result does not depend on the rows it shares a call with (tested bit for bit)."""

    def __init__(self, parts: list[tuple[Source, int]]) -> None:
        self.parts = parts


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

    def gaussian(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """N(0, 1) draws of a large shape in ``dtype`` (float32 Box-Muller on the CPU, cast)."""
        if self.host is not None:
            return normal_(torch.empty(shape, dtype=torch.float32), self.host).to(dtype)
        return torch.randn(shape, dtype=dtype, device=self.device, generator=self.gen)

    def chi2(self, dfs: list[int], n: int) -> Tensor:
        """[len(dfs), n] chi^2 draws, row i with dfs[i] degrees of freedom."""
        if self.host is not None:
            shape = np.asarray(dfs, dtype=np.float64)[:, None] / 2.0
            return torch.from_numpy(2.0 * self.host.standard_gamma(shape, (len(dfs), n)))
        return torch.stack([2.0 * standard_gamma(df / 2.0, (n,), self.gen, self.device, torch.float64)
                            for df in dfs])


class _BlockDraws:
    """``_Draws`` of a ``RowBlocks`` call: each block's draws from its own source, concatenated on
    the row axis."""

    def __init__(self, blocks: RowBlocks, device: torch.device) -> None:
        self.parts = [(_Draws(src, device), n) for src, n in blocks.parts]

    def normal(self, shape: tuple[int, ...]) -> Tensor:        # rows on axis 1
        return torch.cat([d.normal((shape[0], n, *shape[2:])) for d, n in self.parts], 1)

    def gaussian(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:      # rows on axis 0
        return torch.cat([d.gaussian((n, *shape[1:]), dtype) for d, n in self.parts], 0)

    def chi2(self, dfs: list[int], n: int) -> Tensor:
        return torch.cat([d.chi2(dfs, m) for d, m in self.parts], 1)


def span_coupled_chain(x: Tensor, mu: Tensor, kappa: Tensor, log_w: Tensor, h: Tensor, temperature: float,
                       generator: Source | RowBlocks, own: OwnChain,
                       factor: SpanFactor | None = None) -> Tensor:
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
        if isinstance(generator, RowBlocks):
            raise ConfigError(f"span_coupled_chain: row blocks need d > K + S + 1 = {width}, got d = {d}")
        return coupled_full_chain(x, mu.to(x.dtype), kappa, log_w, h, temperature,
                                  generator if not isinstance(generator, HostNoise) else None, own)
    f64 = torch.float64
    dev = x.device
    frame = span_frame(mu, factor=factor)
    draws: _Draws | _BlockDraws = (_BlockDraws(generator, dev) if isinstance(generator, RowBlocks)
                                   else _Draws(generator, dev))
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
    chi2_draw = (lambda dfs: draws.chi2(dfs, b).numpy()) if cpu else (lambda dfs: draws.chi2(dfs, b))
    xc = _span_loop(xp, amax, means, kap, lw, hh, temperature, z, chi2, x1, acc_rec, log_u, normal, chi2_draw, d)
    return _materialise(frame, torch.from_numpy(xc) if cpu else xc, draws, x.dtype)


def _span_loop(xp: Any, amax: Any, means: Any, kap: Any, lw: Any, hh: Any, temperature: float, z: Any, chi2: Any,
               x1: Any, acc_rec: Any, log_u: Any, normal: Any, chi2_draw: Any, d: int) -> Any:
    """The coupled chain's steps in span coordinates on numpy arrays or torch tensors (float64):
    the arithmetic of ``langevin._step`` on [B, W] coordinates. ``normal(shape)`` draws N(0, 1),
    ``chi2_draw(dfs)`` [len(dfs), B] chi^2 draws. Returns the end point's coordinates."""
    b, k, width = means.shape
    steps = z.shape[0]
    npy = xp is np
    if npy:
        def dot(a: Any, c: Any) -> Any:
            return np.einsum("ij,ij->i", a, c)

        def unit(v: Any) -> Any:                       # v / |v|, 0 for v = 0
            return v / np.maximum(np.sqrt(dot(v, v)), 1e-300)[:, None]
        means_t = means.transpose(0, 2, 1)
    else:
        def dot(a: Any, c: Any) -> Any:
            return (a * c).sum(1)

        def unit(v: Any) -> Any:
            return v / xp.sqrt(dot(v, v)).clamp(min=1e-300)[:, None]
        means_t = means.transpose(1, 2)
    kt = kap / temperature

    def density(y: Any) -> tuple[Any, Any]:
        logits = lw + kap * (means @ y[:, :, None])[:, :, 0]       # log w_j + kappa_j mu_j . y
        top = amax(logits)
        e = xp.exp(logits - top[:, None])
        tot = e.sum(1)
        return (top + xp.log(tot)) / temperature, (means_t @ (e * (kt / tot[:, None]))[:, :, None])[:, :, 0]

    # every fresh Gaussian of the chain in one draw: row 0 makes w_0 (a Gaussian on the k frame slots,
    # its remaining norm on slot k), row 1 + i step i's r_i (on the n = k + 1 + i tracked slots, the
    # remaining norm on slot n); slot 0 (mu_0) is removed from both
    g = normal((steps + 1, b, width))
    n = list(range(k, k + steps + 1))                     # slots of each draw; its remaining norm on slot n
    for j, nj in enumerate(n):
        g[j, :, nj + 1:] = 0.0
    g[:, :, 0] = 0.0
    chi = xp.sqrt(chi2_draw([d - nj for nj in n]))
    for j, nj in enumerate(n):
        g[j, :, nj] = chi[j]
    w = unit(g[0])
    xc = 0.0 * w
    xc[:, 0] = 1.0
    sq = xp.sqrt(2.0 * hh)                                          # [B, 1]
    h1 = hh[:, 0]
    sq_rest = xp.sqrt(2.0 * hh * chi2.T)                             # [B, S]
    sq_chi = xp.sqrt(chi2)                                           # [S, B]
    logp, grad = density(xc)
    for i in range(steps):
        gi = g[i + 1]
        r = unit(gi - dot(gi, w)[:, None] * w)                      # off mu_0 and off w
        noise = sq_chi[i][:, None] * r + z[i, 1][:, None] * w
        noise[:, 0] += z[i, 0]
        # one step of langevin._step, v = sqrt(2h) P_x xi + h P_x grad retracted: x + v is
        # (1 - sqrt(2h) x.xi - h x.grad) x + sqrt(2h) xi + h grad
        xz, xg = dot(xc, noise), dot(xc, grad)
        y = (1.0 - sq[:, 0] * xz - h1 * xg)[:, None] * xc + sq * noise + hh * grad
        y = y / xp.sqrt(dot(y, y))[:, None]
        last = i == steps - 1
        if log_u is None:
            xc = y
            if not last:
                logp, grad = density(y)
        else:
            fwd = 2.0 * h1 * (dot(noise, noise) - xz ** 2)
            logp_y, grad_y = density(y)
            c = dot(xc, y)[:, None]
            yg = dot(y, grad_y)[:, None]
            rev_vec = xc / c - y - hh * (grad_y - y * yg)
            rev = dot(rev_vec, rev_vec)
            acc = log_u[i] < logp_y - logp - (rev - fwd) / (4.0 * h1)
            xc = xp.where(acc[:, None], y, xc)
            grad = xp.where(acc[:, None], grad_y, grad)
            logp = xp.where(acc, logp_y, logp)
        nw = x1[i][:, None] * w + sq_rest[:, i:i + 1] * r
        nn = xp.sqrt(dot(nw, nw))
        moved = acc_rec[i] & (nn > 0)
        w = xp.where(moved[:, None], nw / xp.where(nn > 0, nn, 1.0)[:, None], w)
    return xc


def _materialise(frame: SpanFrame, xc: Tensor, draws: "_Draws | _BlockDraws", dtype: torch.dtype) -> Tensor:
    """The point whose coordinates on the kept frame slots are xc's, and whose part outside span(mu)
    has the norm of xc's other coordinates along one uniform direction of that complement (a Gaussian
    with its span part removed). The [B, d] products run in the means' dtype, except for the frame's
    ``wide`` rows (float32 means: see ``m2m.geometry.span``), which are made again in float64."""
    g = draws.gaussian((xc.shape[0], frame.means.shape[2]), frame.means.dtype)
    out = _end_point(frame, xc, g)
    if frame.wide is not None and frame.wide.numel():
        w = frame.wide
        out[w] = _end_point(frame.rows64(w), xc.index_select(0, w), g.index_select(0, w).to(torch.float64))
    return out.to(dtype)


def _end_point(frame: SpanFrame, xc: Tensor, g: Tensor) -> Tensor:
    """``_materialise``'s point from the Gaussian g [B, d] (in the means' dtype); float64 [B, d]."""
    k = frame.kept.shape[1]
    zero = torch.zeros((), dtype=xc.dtype, device=xc.device)
    inside = torch.where(frame.kept, xc[:, :k], zero)
    outside = torch.sqrt((torch.where(frame.kept, zero, xc[:, :k]) ** 2).sum(1) + (xc[:, k:] ** 2).sum(1))
    gk = frame.project_coords(g)
    # |g - P g|^2 = |g|^2 - |P g|^2 (the kept slots are orthonormal); ~d against ~k: no cancellation
    perp = torch.sqrt(torch.clamp(torch.linalg.vecdot(g, g).to(xc.dtype) - (gk * gk).sum(1), min=0.0))
    scale = torch.where(perp > 0, outside / torch.clamp(perp, min=torch.finfo(xc.dtype).tiny), zero)
    out = frame.combine(inside - scale.unsqueeze(1) * gk).addcmul_(g, scale.unsqueeze(1).to(g.dtype))
    # normalised in float64 whatever the means' dtype: a float32 norm would move a chain that stayed at
    # its start (every MALA move rejected) off its float32 mean by an ulp
    out = out.to(torch.float64)
    return out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True))
