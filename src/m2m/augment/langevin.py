"""Riemannian Langevin sampling of the tempered vMF-mixture energy of a row's splats.

The chain (``sample``): from x, one step is

    v  = h grad_S log p(x) + sqrt(2h) xi,     xi ~ N(0, I - x x^T)   (tangent Gaussian)
    x' = (x + v) / |x + v|                                          (projection retraction)

with grad_S the tangent projection of the Euclidean gradient (``m2m.augment.energy``; logsumexp over
components, C_d from ``log_normalizer``) and h = step_size / kappa_ref (see ``energy``). With
``metropolis=True`` each proposal is accepted with the MALA probability, using the exact proposal
density of the retraction (its Jacobian (x.x')^{-d} is symmetric and cancels), so the chain leaves
p exactly invariant; without it (ULA) the stationary law is p up to an O(step_size) bias.

A chain started at a component's own mean (``own_component_chain``): when all other components carry
negligible weight along the path, the chain is the Langevin chain of one vMF(mu_0, kappa_0 / T),
whose state is exactly described by (t = mu_0.x, rho = |x - t mu_0|): the orthogonal part of x is
uniform on its sphere by symmetry, so each step needs 3 random numbers instead of d, and the result
is materialised once (``m2m.geometry.sphere.random_point_at_cosine``). Whether the other components
are negligible (softmax weight <= eps = 1e-9 of the own one at every point the chain evaluates,
except with probability delta = 1e-9) is decided in two ways, both leaving the law exact:
``negligible_neighbours`` before sampling, from concentration bounds on the noise along the fixed
directions of the other means (path-independent); ``negligible_on_path`` after the two-coordinate
run, from the realised (t, rho) path, given which the orthogonal direction is uniform. Rows that
fail are rerun by ``coupled_full_chain``: the exact full-dimensional chain driven by the *same*
noise (rebuilt around the recorded path). Rerunning them with fresh noise instead would bias the
output towards paths that failed the check; with the coupling, every row's output is the exact
chain's output (same noise) up to float rounding, except with probability delta.

Default strength (step_size = 0.06 = M2MConfig.langevin_dt, 5 steps, ULA, T = 1): a row whose own
vMF has mean cosine A to its mean gets samples of mean cosine 1 - f (1 - A) to the source mean, with
f = 0.48 (A = 0.9 -> 0.952), independent of d and kappa. Other step sizes (5 steps): 0.03 -> f = 0.28,
0.1 -> 0.68, 0.15 -> 0.85, 0.3 -> 1.07 (f > 1 is the ULA bias of large steps; f = 1 is the vMF itself).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m2m.augment.energy import (
    component_log_weights,
    log_density_and_gradient,
    step_length,
    validate_chain_args,
)
from m2m.errors import ConfigError, InvalidEmbeddingError
from m2m.geometry.noise import HostNoise, Source, normal_
from m2m.geometry.sphere import normalize, uniform_tangent_direction
from m2m.geometry.vmf import standard_gamma

__all__ = [
    "PRUNE_DELTA",
    "PRUNE_EPS",
    "OwnChain",
    "coupled_full_chain",
    "full_chain",
    "negligible_neighbours",
    "negligible_on_path",
    "own_component_chain",
    "path_terms",
    "sample",
]

PRUNE_EPS = 1e-9
"""Largest softmax weight (relative to the own component) a pruned component may reach. Dropping such
a component moves a step by at most ~ step_size * eps * (1 + kappa_j / kappa_0) (the gradient's share
of it, times h), below float32 rounding of the unit-norm output for concentration ratios up to ~50;
with MALA the acceptance log-ratio moves by ~2 eps. 1e-12 reran twice the rows on the demo lake
(docs/geometry.md)."""
PRUNE_DELTA = 1e-9
"""Probability, per row, that the bound behind pruning fails (the row is then the one-component
chain's, though a neighbour reached a weight above eps somewhere on its path)."""


# --------------------------------------------------------------------------------------------
# the full-dimensional chain (reference and general path)
# --------------------------------------------------------------------------------------------

def sample(x: Tensor, mu: Tensor, kappa: Tensor, alpha: Tensor, steps: int, step_size: float,
           temperature: float = 1.0, generator: torch.Generator | None = None, mask: Tensor | None = None,
           metropolis: bool = False, step_kappa: Tensor | None = None) -> Tensor:
    """``steps`` Riemannian Langevin steps on each row's vMF-mixture energy; returns [B, d] unit rows.

    Args:
        x: [B, d] start points (normalised here).
        mu: [B, K, d] component means (normalised here); kappa, alpha: [B, K] (kappa >= 0, alpha > 0).
        steps, step_size: number of steps and the dimensionless step (h = step_size / kappa_ref).
        temperature: the target is p^(1/T).
        generator: torch.Generator on x's device.
        mask: [B, K] bool, False = component absent (each row needs one present component).
        metropolis: MALA accept/reject, which makes p exactly invariant.
        step_kappa: [B] concentration that sets each row's step, h = step_size / max(step_kappa / T, d - 1);
            default: the largest kappa over the row's present components. ``LangevinAugmenter`` passes
            the row's own kappa (its strength does not depend on the neighbours).
    The arithmetic is done in x's dtype (float32 or float64).
    """
    validate_chain_args(steps, step_size, temperature)
    x, mu, kappa, alpha, mask = _validate(x, mu, kappa, alpha, mask)
    d = x.shape[1]
    if step_kappa is None:
        h = step_length(step_size, kappa, mask, d, temperature)
    else:
        sk = torch.as_tensor(step_kappa, device=x.device).to(torch.float64)
        if sk.shape != (x.shape[0],) or not bool((torch.isfinite(sk) & (sk >= 0)).all()):
            raise ConfigError(f"step_kappa must be finite, >= 0 and [B={x.shape[0]}], got {tuple(sk.shape)}")
        h = step_length(step_size, sk.unsqueeze(1), None, d, temperature)
    log_w = component_log_weights(kappa, alpha, d, mask)
    log_w = log_w - log_w.amax(1, keepdim=True)   # softmax is shift-free; keeps float32 logits small
    return full_chain(x, mu, kappa.to(x.dtype), log_w.to(x.dtype), h, steps, temperature, generator,
                      metropolis)


def full_chain(x: Tensor, mu: Tensor, kappa: Tensor, log_w: Tensor, h: Tensor, steps: int,
               temperature: float, generator: torch.Generator | None, metropolis: bool) -> Tensor:
    """The chain of ``sample`` on validated inputs: x [B, d] unit, mu [B, K, d] unit, kappa and
    log_w [B, K] in x's dtype (log_w = component_log_weights), h [B] (float64)."""
    x = x.clone()
    if steps == 0:
        return x
    bufs = _Buffers(x)
    hh = h.to(x.dtype).unsqueeze(1)
    logp, grad = log_density_and_gradient(x, mu, kappa, log_w, temperature, grad_out=bufs.grad)
    for i in range(steps):
        noise = bufs.noise.normal_(generator=generator)
        log_u = None
        if metropolis:
            log_u = torch.log(torch.rand(x.shape[0], dtype=x.dtype, device=x.device, generator=generator))
        x, logp, grad = _step(x, logp, grad, noise, log_u, mu, kappa, log_w, hh, temperature, bufs,
                              last=i == steps - 1)
    return x


class _Buffers:
    """Reused [B, d] work tensors of a chain: two points and two gradients (the current one and the
    next, swapped each step) and the noise. Fresh large temporaries on every step fault pages."""

    def __init__(self, x: Tensor) -> None:
        self.point = torch.empty_like(x)
        self.grad = torch.empty_like(x)
        self.grad_next = torch.empty_like(x)
        self.noise = torch.empty_like(x)


def _step(x: Tensor, logp: Tensor, grad: Tensor, noise: Tensor, log_u: Tensor | None, mu: Tensor, kappa: Tensor,
          log_w: Tensor, hh: Tensor, temperature: float, bufs: _Buffers,
          last: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One ULA (``log_u`` None) or MALA step driven by the Gaussian ``noise`` [B, d] (overwritten);
    returns the new point with log p and its gradient there (not evaluated after the ``last`` ULA
    step). Works in ``bufs``: the returned point and gradient live there (x's storage is recycled)."""
    sq = torch.sqrt(2.0 * hh)
    xz = torch.linalg.vecdot(x, noise).unsqueeze(1)
    xg = torch.linalg.vecdot(x, grad).unsqueeze(1)
    fwd = None
    if log_u is not None:  # forward: v - m(x) = sqrt(2h) P_x xi, |.|^2 = 2h (|xi|^2 - (x.xi)^2)
        fwd = 2.0 * hh.squeeze(1) * (torch.linalg.vecdot(noise, noise) - xz.squeeze(1) ** 2)
    v = noise.addcmul_(x, xz, value=-1.0).mul_(sq)        # sqrt(2h) P_x xi
    v.addcmul_(grad, hh).addcmul_(x, hh * xg, value=-1.0)  # + h P_x grad
    y = torch.add(x, v, out=bufs.point)
    y.div_(torch.linalg.vector_norm(y, dim=1, keepdim=True))
    if log_u is None and last:
        return y, logp, grad
    logp_y, grad_y = log_density_and_gradient(y, mu, kappa, log_w, temperature, grad_out=bufs.grad_next)
    if log_u is None:
        bufs.point, bufs.grad, bufs.grad_next = x, grad_y, grad
        return y, logp_y, grad_y
    # reverse tangent vector at y: x / (x.y) - y, minus m(y) = h P_y grad(y)
    assert fwd is not None
    c = torch.linalg.vecdot(x, y).unsqueeze(1)
    yg = torch.linalg.vecdot(y, grad_y).unsqueeze(1)
    rev_vec = torch.div(x, c, out=v).sub_(y)
    rev_vec.addcmul_(grad_y, hh, value=-1.0).addcmul_(y, hh * yg)
    rev = torch.linalg.vecdot(rev_vec, rev_vec)
    h1 = hh.squeeze(1)
    acc = log_u < logp_y - logp - (rev - fwd) / (4.0 * h1)
    a1 = acc.unsqueeze(1)
    x_new, g_new = torch.where(a1, y, x), torch.where(a1, grad_y, grad)
    return x_new, torch.where(acc, logp_y, logp), g_new


def _validate(x: Tensor, mu: Tensor, kappa: Tensor, alpha: Tensor, mask: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not (isinstance(x, Tensor) and isinstance(mu, Tensor)):
        raise InvalidEmbeddingError("x and mu must be tensors")
    if x.dim() != 2 or mu.dim() != 3 or mu.shape[0] != x.shape[0] or mu.shape[2] != x.shape[1]:
        raise InvalidEmbeddingError(f"expected x [B, d] and mu [B, K, d], got {tuple(x.shape)} and {tuple(mu.shape)}")
    b, k, d = mu.shape
    if d < 2 or k < 1:
        raise InvalidEmbeddingError(f"need d >= 2 and K >= 1, got d={d}, K={k}")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x = x.to(dtype)
    mu = mu.to(device=x.device, dtype=dtype)
    kappa = torch.as_tensor(kappa, device=x.device)
    alpha = torch.as_tensor(alpha, device=x.device)
    for name, t in (("kappa", kappa), ("alpha", alpha)):
        if t.shape != (b, k):
            raise ConfigError(f"{name} must be [B={b}, K={k}], got {tuple(t.shape)}")
    if mask is None:
        mask = torch.ones(b, k, dtype=torch.bool, device=x.device)
    elif mask.shape != (b, k) or mask.dtype != torch.bool:
        raise ConfigError(f"mask must be a bool tensor [B={b}, K={k}], got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.to(x.device)
    if not bool(mask.any(1).all()):
        first = int(torch.nonzero(~mask.any(1))[0])
        raise ConfigError(f"every row needs a present component (row {first} has none)")
    kap = torch.where(mask, kappa.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    alp = torch.where(mask, alpha.to(torch.float64), torch.ones((), dtype=torch.float64, device=x.device))
    if not bool((torch.isfinite(kap) & (kap >= 0)).all()):
        raise ConfigError("kappa must be finite and >= 0 for present components")
    if not bool((torch.isfinite(alp) & (alp > 0)).all()):
        raise ConfigError("alpha must be finite and > 0 for present components")
    x = normalize(x, name="x")
    mn = torch.linalg.vector_norm(mu, dim=2, keepdim=True)
    if not bool(torch.isfinite(mn).all()):
        raise InvalidEmbeddingError("mu contains NaN or Inf")
    mn = torch.where(mn > 0, mn, torch.ones_like(mn))  # zero means are only allowed where masked
    return x, mu / mn, kap, alp, mask


# --------------------------------------------------------------------------------------------
# the chain of one component started at its mean, in the coordinates (t, rho)
# --------------------------------------------------------------------------------------------

@dataclass
class OwnChain:
    """A run of ``own_component_chain``: final (t, rho) and, when recorded, what a replay needs.

    ``visited_t``/``visited_rho`` [P, B]: every point at which the exact chain evaluates its density
    (the states before each step, and with MALA also the proposals). ``z`` [S, 2, B], ``chi2`` [S, B],
    ``log_u`` [S, B] (MALA): the noise; ``x1`` [S, B]: coefficient of the old orthogonal direction in
    the new orthogonal part; ``acc`` [S, B]: accepted moves.
    """

    t: Tensor
    rho: Tensor
    visited_t: Tensor | None = None
    visited_rho: Tensor | None = None
    z: Tensor | None = None
    chi2: Tensor | None = None
    log_u: Tensor | None = None
    x1: Tensor | None = None
    acc: Tensor | None = None

    def rows(self, idx: Tensor) -> "OwnChain":
        """The same run restricted to rows ``idx``."""
        def pick(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.index_select(v.dim() - 1, idx)
        # fields(self) loses the per-field types; every field is a Tensor or None
        return OwnChain(*(pick(getattr(self, f.name)) for f in fields(self)))  # type: ignore[arg-type]

    @staticmethod
    def cat(runs: "list[OwnChain]") -> "OwnChain":
        """The runs of several row sets as one (rows in order; all recorded alike)."""
        def join(name: str) -> Tensor | None:
            parts = [getattr(r, name) for r in runs]
            return None if parts[0] is None else torch.cat(parts, parts[0].dim() - 1)
        # as in ``rows``: every field is a Tensor or None
        return OwnChain(*(join(f.name) for f in fields(OwnChain)))  # type: ignore[arg-type]


def own_component_chain(h: Tensor, kappa: Tensor, steps: int, dim: int, generator: Source,
                        metropolis: bool = False, record: bool = False) -> OwnChain:
    """The Langevin chain of ``sample`` for the single target vMF(mu_0, kappa) started at mu_0.

    ``h`` and ``kappa`` (already divided by the temperature) are [B]; returns the final t = mu_0.x and
    rho = |x - t mu_0| (float64 [B]) of points whose direction orthogonal to mu_0 is uniform. Exact in
    law: per step the Gaussian noise is split into its component along mu_0, the one along the current
    orthogonal direction and a chi^2_{d-2} for the rest. ``record`` keeps the path and the noise.
    """
    dev = h.device
    b = h.shape[0]
    h = h.to(torch.float64).contiguous()
    kap = kappa.to(torch.float64).contiguous()
    if steps == 0 or b == 0:
        t = torch.ones(b, dtype=torch.float64, device=dev)
        rho = torch.zeros(b, dtype=torch.float64, device=dev)
        empty = torch.zeros((0, b), dtype=torch.float64, device=dev)
        return OwnChain(t, rho, empty, empty) if record else OwnChain(t, rho)
    z, chi2, log_u = _own_chain_noise(steps, b, dim, generator, dev, metropolis)
    n_vis = 2 * steps if metropolis else steps
    rec = None
    if record:
        rec = (torch.empty((n_vis, b), dtype=torch.float64, device=dev),      # visited t
               torch.empty((n_vis, b), dtype=torch.float64, device=dev),      # visited rho
               torch.empty((steps, b), dtype=torch.float64, device=dev),      # x1
               torch.ones((steps, b), dtype=torch.bool, device=dev))          # accepted
    # The loop is arithmetic on [B] vectors: on the CPU numpy runs it with a fraction of torch's
    # per-operation overhead (views share memory, so nothing is copied).
    cpu = dev.type == "cpu"
    xp = np if cpu else torch
    view = (lambda v: v.numpy()) if cpu else (lambda v: v)
    t_out, rho_out = _own_chain_loop(xp, view(h), view(kap), view(z), view(chi2),
                                     None if log_u is None else view(log_u),
                                     None if rec is None else tuple(view(r) for r in rec))
    if cpu:
        t_out, rho_out = torch.from_numpy(np.ascontiguousarray(t_out)), torch.from_numpy(np.ascontiguousarray(rho_out))
    if rec is None:
        return OwnChain(t_out, rho_out)
    return OwnChain(t_out, rho_out, rec[0], rec[1], z, chi2, log_u, rec[2], rec[3])


def _own_chain_noise(steps: int, b: int, dim: int, generator: Source, dev: torch.device,
                     metropolis: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The noise of ``own_component_chain``: z [S, 2, B] N(0, 1), chi2 [S, B] chi^2_{d-2}, log U [S, B]
    (MALA only), float64; from ``HostNoise`` on the CPU, torch's generator elsewhere."""
    if dev.type == "cpu":
        host = HostNoise.of(generator)
        z = torch.from_numpy(host.standard_normal((steps, 2, b)))
        chi2 = (torch.from_numpy(2.0 * host.standard_gamma((dim - 2) / 2.0, (steps, b))) if dim > 2
                else torch.zeros((steps, b), dtype=torch.float64))
        log_u = torch.from_numpy(np.log(host.uniform((steps, b)))) if metropolis else None
        return z, chi2, log_u
    if isinstance(generator, HostNoise):
        generator = generator.torch_generator(dev)
    # the noise is drawn in float32 (cheaper; it is only noise) and used in float64
    z = torch.randn((steps, 2, b), device=dev, generator=generator).to(torch.float64)
    if dim > 2:
        chi2 = 2.0 * standard_gamma((dim - 2) / 2.0, (steps, b), generator, dev, torch.float32).to(torch.float64)
    else:
        chi2 = torch.zeros((steps, b), dtype=torch.float64, device=dev)
    log_u = None
    if metropolis:
        log_u = torch.log(torch.rand((steps, b), dtype=torch.float64, device=dev, generator=generator))
    return z, chi2, log_u


def _own_chain_loop(xp: Any, h: Any, kap: Any, z: Any, chi2: Any, log_u: Any, rec: Any) -> tuple[Any, Any]:
    """The steps of ``own_component_chain`` on numpy arrays or torch tensors (``xp`` = np or torch)."""
    steps = z.shape[0]
    sq = xp.sqrt(2.0 * h)
    hk = h * kap
    d0 = hk + sq * z[:, 0]                      # noise + drift along mu_0
    d1 = sq * z[:, 1]                           # noise along the current orthogonal direction
    rest = 2.0 * h * chi2                       # squared noise in the remaining d - 2 directions
    t = xp.ones_like(h)
    rho = xp.zeros_like(h)
    for i in range(steps):
        if rec is not None:
            rec[0][i], rec[1][i] = t, rho
        if i == 0 and log_u is None:
            # from x = mu_0 (t = 1, rho = 0): x + P_x D = mu_0 + D1 w + rest, in closed form
            r2 = rest[0] + d1[0] * d1[0]
            inv = 1.0 / xp.sqrt(r2 + 1.0)
            if rec is not None:
                rec[2][0] = d1[0]
            t, rho = inv, xp.sqrt(r2) * inv
            continue
        one_m = 1.0 - (t * d0[i] + rho * d1[i])     # 1 - x . D
        x0 = d0[i] + t * one_m
        x1 = d1[i] + rho * one_m
        r2 = rest[i] + x1 * x1
        n = xp.sqrt(r2 + x0 * x0)                    # |x + P_x D| = 1 / (x . x')
        t_new = x0 / n
        rho_new = xp.sqrt(r2) / n
        if rec is not None:
            rec[2][i] = x1
        if log_u is None:
            t, rho = t_new, rho_new
            continue
        if rec is not None:
            rec[0][steps + i], rec[1][steps + i] = t_new, rho_new
        # |v - m(x)|^2 = 2h |P_x zeta|^2 and |v_rev - m(x')|^2 in closed form (hk = h kappa)
        zz = z[i, 0] * z[i, 0] + z[i, 1] * z[i, 1] + chi2[i]
        xz = t * z[i, 0] + rho * z[i, 1]
        fwd = 2.0 * h * (zz - xz * xz)
        rev = n * n - (1.0 - hk * t_new) ** 2 + hk * hk - 2.0 * hk * t * n
        acc = log_u[i] < kap * (t_new - t) - (rev - fwd) / (4.0 * h)
        t = xp.where(acc, t_new, t)
        rho = xp.where(acc, rho_new, rho)
        if rec is not None:
            rec[3][i] = acc
    return t, rho


def coupled_full_chain(x: Tensor, mu: Tensor, kappa: Tensor, log_w: Tensor, h: Tensor, temperature: float,
                       generator: torch.Generator | None, own: OwnChain) -> Tensor:
    """The exact chain (all components) from x = mu_0 = mu[:, 0], driven by the noise of the recorded
    one-component run ``own`` (rows as in x).

    The d-dimensional noise of step s is rebuilt as z0 mu_0 + z1 w_s + sqrt(chi2) r_s, with w_s the
    one-component chain's orthogonal direction (a function of the past) and r_s a fresh uniform
    direction orthogonal to both: an exact N(0, I_d) draw, so this is the exact chain, and it equals
    the one-component chain wherever the other components' weights are negligible. This keeps the
    output law exact when the decision to run it was taken on the recorded (t, rho) path.
    """
    assert own.z is not None and own.chi2 is not None and own.x1 is not None and own.acc is not None
    steps = own.z.shape[0]
    x = x.clone()
    if steps == 0:
        return x
    dt = x.dtype
    mu0 = x.clone()
    hh = h.to(dt).unsqueeze(1)
    sq_rest = torch.sqrt(2.0 * h.to(torch.float64).unsqueeze(1) * own.chi2.T).to(dt)   # [B, S]
    w = uniform_tangent_direction(mu0, generator)                 # the (arbitrary) direction at rho = 0
    bufs = _Buffers(x)
    logp, grad = log_density_and_gradient(x, mu, kappa, log_w, temperature, grad_out=bufs.grad)
    g = torch.empty_like(x)
    fresh = HostNoise.of(generator) if x.device.type == "cpu" else generator   # the r_s draws
    for i in range(steps):
        normal_(g, fresh)
        r = g - torch.linalg.vecdot(g, mu0).unsqueeze(1) * mu0 - torch.linalg.vecdot(g, w).unsqueeze(1) * w
        rn = torch.linalg.vector_norm(r, dim=1, keepdim=True)
        r = torch.where(rn > 0, r / torch.clamp(rn, min=torch.finfo(dt).tiny), torch.zeros_like(r))
        chi = torch.sqrt(own.chi2[i]).to(dt).unsqueeze(1)
        noise = own.z[i, 0].to(dt).unsqueeze(1) * mu0 + own.z[i, 1].to(dt).unsqueeze(1) * w + chi * r
        log_u = None if own.log_u is None else own.log_u[i].to(dt)
        x, logp, grad = _step(x, logp, grad, noise, log_u, mu, kappa, log_w, hh, temperature, bufs,
                              last=i == steps - 1)
        # the one-component chain's orthogonal direction after step i
        nw = own.x1[i].to(dt).unsqueeze(1) * w + sq_rest[:, i:i + 1] * r
        nn = torch.linalg.vector_norm(nw, dim=1, keepdim=True)
        moved = own.acc[i].unsqueeze(1) & (nn > 0)
        w = torch.where(moved, nw / torch.clamp(nn, min=torch.finfo(dt).tiny), w)
    return x


# --------------------------------------------------------------------------------------------
# when the other components can be dropped
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _chi2_upper_bound(df: int, prob: float) -> float:
    """q with P(chi^2_df >= q) <= prob, from the Chernoff bound (y e^{1-y})^{df/2}, y = q/df."""
    target = math.log(1.0 / prob) * 2.0 / df
    lo, hi = 1.0, 2.0
    while hi - 1.0 - math.log(hi) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid - 1.0 - math.log(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi * df


def negligible_neighbours(cos0: Tensor, kappa_nb: Tensor, log_w_nb: Tensor, kappa0: Tensor, log_w0: Tensor,
                          h: Tensor, steps: int, dim: int, temperature: float, metropolis: bool = False,
                          delta: float = PRUNE_DELTA, eps: float = PRUNE_EPS) -> Tensor:
    """Rows [B] whose other components stay negligible along the chain started at the own mean mu_0.

    Inputs: cos0 = mu_0.mu_j, kappa_nb, log_w_nb (-inf = absent) [B, k]; kappa0, log_w0, h [B].
    True means: with probability >= 1 - delta over the noise, the own-component chain visits only
    points where every other component's softmax weight is <= eps times the own one, so pruning them
    changes the chain by less than float rounding. The bound: with t = mu_0.x, rho = |x - t mu_0| and
    m_j the coordinate of x along the part of mu_j orthogonal to mu_0,
    log(w_j / w_0) = [a_j - a_0 + (kappa_j c_j - kappa_0) t + kappa_j sqrt(1 - c_j^2) m_j] / T, and
    per step rho^2 <= phi^2 rho^2 + 2 phi sqrt(2h) c rho + 2h (sqrt(d-1) + c)^2 and
    |m_j| <= phi |m_j| + sqrt(2h) |g_j| (g_j ~ N(0, 1), phi = 1 + sqrt(2h) c), which hold when the
    Gaussian tails are cut at c = sqrt(2 log(4 n / delta)) and sum_s g_js^2 at a chi^2 quantile;
    t >= sqrt(1 - rho^2) > 0 while rho <= 1/sqrt(2).
    """
    f64 = torch.float64
    c0 = torch.clamp(cos0.to(f64), min=-1.0, max=1.0)
    kn, an = kappa_nb.to(f64), log_w_nb.to(f64)
    k0, a0, h = kappa0.to(f64).unsqueeze(1), log_w0.to(f64).unsqueeze(1), h.to(f64)
    if steps == 0:
        return torch.ones(h.shape, dtype=torch.bool, device=h.device)
    positions = steps + 1 if metropolis else steps   # points at which the weights matter
    if positions <= 1:
        big_r = torch.zeros_like(h)
        big_m = torch.zeros_like(h)
    else:
        jumps = positions - 1
        c = math.sqrt(2.0 * math.log(4.0 * jumps / delta))
        sq = torch.sqrt(2.0 * h)
        phi = 1.0 + sq * c
        qb = 2.0 * h * (math.sqrt(dim - 1) + c) ** 2
        r = torch.zeros_like(h)
        for _ in range(jumps):
            r = torch.sqrt(phi * phi * r * r + 2.0 * phi * sq * c * r + qb)
        big_r = r
        q = _chi2_upper_bound(jumps, delta / (4.0 * max(1, cos0.shape[1])))
        big_m = torch.minimum(phi ** (jumps - 1) * sq * math.sqrt(jumps * q), big_r)
    ok = big_r <= math.sqrt(0.5)
    t_min = torch.sqrt(torch.clamp(1.0 - big_r * big_r, min=0.0)).unsqueeze(1)
    slope = kn * c0 - k0
    beta = torch.sqrt(torch.clamp(1.0 - c0 * c0, min=0.0))
    bound = an - a0 + torch.maximum(slope, slope * t_min) + kn * beta * big_m.unsqueeze(1)
    small = (bound / temperature < math.log(eps)) | torch.isneginf(an)
    return ok & small.all(1)


def path_terms(cos0: Tensor, kappa_nb: Tensor, log_w_nb: Tensor, kappa0: Tensor, log_w0: Tensor,
               temperature: float, eps: float = PRUNE_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Per (row, component) constants of ``negligible_on_path``: (room, slope, scale), float32 [B, k].

    log(w_j / w_0) < log eps at a point (t, rho, v) iff kappa_j beta_j rho v < room - slope t, with
    room = T log eps - (a_j - a_0), slope = kappa_j c_j - kappa_0 and scale = kappa_j beta_j,
    beta_j = sqrt(1 - c_j^2). ``room`` is lowered by a margin that covers float32 rounding, and is
    +inf for absent components.
    """
    f64 = torch.float64
    c0 = torch.clamp(cos0.to(f64), min=-1.0, max=1.0)
    kn, an = kappa_nb.to(f64), log_w_nb.to(f64)
    k0, a0 = kappa0.to(f64).unsqueeze(1), log_w0.to(f64).unsqueeze(1)
    present = ~torch.isneginf(an)
    base = torch.where(present, an - a0, torch.zeros_like(an))
    slope = kn * c0 - k0
    scale = kn * torch.sqrt(torch.clamp(1.0 - c0 * c0, min=0.0))
    margin = 1e-5 * (base.abs() + slope.abs() + scale) + 1e-3
    room = temperature * math.log(eps) - base - margin
    room = torch.where(present, room, torch.full_like(room, math.inf))
    return room.float(), slope.float(), scale.float()


def negligible_on_path(own: OwnChain, room: Tensor, slope: Tensor, scale: Tensor, dim: int,
                       delta: float = PRUNE_DELTA) -> Tensor:
    """Rows [B] of a recorded one-component run on which the other components stay negligible.

    ``room``, ``slope``, ``scale`` [B, k] come from ``path_terms``. Given the realised (t, rho) path,
    the orthogonal direction of each visited point is uniform on the unit sphere of mu_0's complement,
    so its coordinate v along the orthogonal part of mu_j has P(|v| > c) <= 2 exp(-(d-1) c^2 / 2). A row
    passes when, at each of the P visited points and for each of the k components, that probability
    for c = (room - slope t) / (scale rho) is <= delta / (P k) (so the sum is <= delta). Rows that pass
    are the exact chain except with probability delta; rows that fail must be rerun with
    ``coupled_full_chain`` (same noise).
    """
    assert own.visited_t is not None and own.visited_rho is not None
    p, k = own.visited_t.shape[0], room.shape[1]
    if p == 0 or k == 0:
        return torch.ones(room.shape[0], dtype=torch.bool, device=room.device)
    c_min = math.sqrt(2.0 * math.log(2.0 * p * k / delta) / (dim - 1))
    t = own.visited_t.float().unsqueeze(2)                                       # [P, B, 1]
    rho = own.visited_rho.float().unsqueeze(2)
    free = torch.addcmul(room, slope, t, value=-1.0)                              # room - slope t
    ok = free > (c_min * scale) * rho
    return ok.all(2).all(0)
