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
is materialised once (``m2m.geometry.sphere.random_point_at_cosine``). ``negligible_neighbours``
decides, per row and before sampling, when that holds: it bounds, with probability >= 1 - delta over
the noise, every other component's softmax weight by eps at every point the chain can visit
(concentration bounds on the noise along the fixed directions of the other means; delta = eps =
1e-12). Such a row's samples then coincide with the exact chain's (same noise) up to float rounding,
except with probability delta; the rows that fail use ``sample`` with all components.

Default strength (step_size = 0.06 = M2MConfig.langevin_dt, 5 steps, ULA, T = 1): a row whose own
vMF has mean cosine A to its mean gets samples of mean cosine 1 - f (1 - A) to the source mean, with
f = 0.48 (A = 0.9 -> 0.952), independent of d and kappa. Other step sizes (5 steps): 0.03 -> f = 0.28,
0.1 -> 0.68, 0.15 -> 0.85, 0.3 -> 1.07 (f > 1 is the ULA bias of large steps; f = 1 is the vMF itself).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from m2m.augment.energy import (
    component_log_weights,
    log_density_and_gradient,
    step_length,
    validate_chain_args,
)
from m2m.errors import ConfigError, InvalidEmbeddingError

__all__ = [
    "PRUNE_DELTA",
    "PRUNE_EPS",
    "full_chain",
    "negligible_neighbours",
    "own_component_chain",
    "sample",
]

PRUNE_EPS = 1e-12
"""Largest softmax weight (relative to the own component) a pruned component may reach."""
PRUNE_DELTA = 1e-12
"""Probability, per row, that the bound behind pruning fails."""


# --------------------------------------------------------------------------------------------
# the full-dimensional chain (reference and general path)
# --------------------------------------------------------------------------------------------

def sample(x: Tensor, mu: Tensor, kappa: Tensor, alpha: Tensor, steps: int, step_size: float,
           temperature: float = 1.0, generator: torch.Generator | None = None, mask: Tensor | None = None,
           metropolis: bool = False) -> Tensor:
    """``steps`` Riemannian Langevin steps on each row's vMF-mixture energy; returns [B, d] unit rows.

    Args:
        x: [B, d] start points (normalised here).
        mu: [B, K, d] component means (normalised here); kappa, alpha: [B, K] (kappa >= 0, alpha > 0).
        steps, step_size: number of steps and the dimensionless step (h = step_size / kappa_ref).
        temperature: the target is p^(1/T).
        generator: torch.Generator on x's device.
        mask: [B, K] bool, False = component absent (each row needs one present component).
        metropolis: MALA accept/reject, which makes p exactly invariant.
    The arithmetic is done in x's dtype (float32 or float64).
    """
    validate_chain_args(steps, step_size, temperature)
    x, mu, kappa, alpha, mask = _validate(x, mu, kappa, alpha, mask)
    d = x.shape[1]
    h = step_length(step_size, kappa, mask, d, temperature)
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
    hh = h.to(x.dtype).unsqueeze(1)
    sq = torch.sqrt(2.0 * hh)
    noise = torch.empty_like(x)
    logp, grad = log_density_and_gradient(x, mu, kappa, log_w, temperature)
    for _ in range(steps):
        noise.normal_(generator=generator)
        xz = torch.linalg.vecdot(x, noise).unsqueeze(1)
        xg = torch.linalg.vecdot(x, grad).unsqueeze(1)
        v = hh * (grad - xg * x) + sq * (noise - xz * x)
        y = x + v
        y = y / torch.linalg.vector_norm(y, dim=1, keepdim=True)
        logp_y, grad_y = log_density_and_gradient(y, mu, kappa, log_w, temperature)
        if not metropolis:
            x, logp, grad = y, logp_y, grad_y
            continue
        # forward: v - m(x) = sqrt(2h) P_x xi; reverse tangent vector at y: x / (x.y) - y
        fwd = 2.0 * hh.squeeze(1) * (torch.linalg.vecdot(noise, noise) - xz.squeeze(1) ** 2)
        c = torch.linalg.vecdot(x, y).unsqueeze(1)
        yg = torch.linalg.vecdot(y, grad_y).unsqueeze(1)
        rev_vec = x / c - y - hh * (grad_y - yg * y)
        rev = torch.linalg.vecdot(rev_vec, rev_vec)
        log_acc = logp_y - logp - (rev - fwd) / (4.0 * hh.squeeze(1))
        u = torch.rand(x.shape[0], dtype=x.dtype, device=x.device, generator=generator)
        acc = torch.log(u) < log_acc
        a1 = acc.unsqueeze(1)
        x = torch.where(a1, y, x)
        grad = torch.where(a1, grad_y, grad)
        logp = torch.where(acc, logp_y, logp)
    return x


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
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(mu).all())):
        raise InvalidEmbeddingError("x or mu contains NaN or Inf")
    xn = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    mn = torch.linalg.vector_norm(mu, dim=2, keepdim=True)
    if bool((xn == 0).any()):
        raise InvalidEmbeddingError(f"x row {int(torch.nonzero(xn.squeeze(1) == 0)[0])} is a zero vector")
    mn = torch.where(mn > 0, mn, torch.ones_like(mn))  # zero means are only allowed where masked
    return x / xn, mu / mn, kap, alp, mask


# --------------------------------------------------------------------------------------------
# the chain of one component started at its mean, in the coordinates (t, rho)
# --------------------------------------------------------------------------------------------

def own_component_chain(h: Tensor, kappa: Tensor, steps: int, dim: int, generator: torch.Generator | None,
                        metropolis: bool = False) -> tuple[Tensor, Tensor]:
    """The Langevin chain of ``sample`` for the single target vMF(mu_0, kappa) started at mu_0.

    ``h`` and ``kappa`` (already divided by the temperature) are [B]; returns (t, rho) float64 [B]
    with t = mu_0.x and rho = sqrt(1 - t^2) of the final point, whose direction orthogonal to mu_0 is
    uniform. Exact in law: per step the noise is split into its component along mu_0, the one along
    the current orthogonal direction, and a chi^2_{d-2} for the rest.
    """
    dev = h.device
    b = h.shape[0]
    h = h.to(torch.float64)
    kap = kappa.to(torch.float64)
    t = torch.ones(b, dtype=torch.float64, device=dev)
    rho = torch.zeros(b, dtype=torch.float64, device=dev)
    if steps == 0 or b == 0:
        return t, rho
    sq = torch.sqrt(2.0 * h)
    hk = h * kap
    z = torch.randn((steps, 2, b), dtype=torch.float64, device=dev, generator=generator)
    if dim > 2:
        shape = torch.full((steps, b), (dim - 2) / 2.0, dtype=torch.float64, device=dev)
        chi2 = 2.0 * torch._standard_gamma(shape, generator=generator)
    else:
        chi2 = torch.zeros((steps, b), dtype=torch.float64, device=dev)
    d0 = torch.addcmul(hk, sq, z[:, 0])        # noise + drift along mu_0
    d1 = sq * z[:, 1]                           # noise along the current orthogonal direction
    rest = 2.0 * h * chi2                       # squared noise in the remaining d - 2 directions
    if metropolis:
        u = torch.log(torch.rand((steps, b), dtype=torch.float64, device=dev, generator=generator))
    for i in range(steps):
        xd = t * d0[i] + rho * d1[i]            # x . D
        one_m = 1.0 - xd
        x0 = torch.addcmul(d0[i], t, one_m)
        x1 = torch.addcmul(d1[i], rho, one_m)
        r2 = torch.addcmul(rest[i], x1, x1)
        n = torch.sqrt(x0 * x0 + r2)            # |x + P_x D| = 1 / (x . x')
        t_new = x0 / n
        rho_new = torch.sqrt(r2) / n
        if not metropolis:
            t, rho = t_new, rho_new
            continue
        # |v - m(x)|^2 = 2h |P_x zeta|^2 and |v_rev - m(x')|^2 in closed form (a = h kappa)
        zz = z[i, 0] ** 2 + z[i, 1] ** 2 + chi2[i]
        xz = t * z[i, 0] + rho * z[i, 1]
        fwd = 2.0 * h * (zz - xz * xz)
        rev = n * n - (1.0 - hk * t_new) ** 2 + hk * hk - 2.0 * hk * t * n
        log_acc = kap * (t_new - t) - (rev - fwd) / (4.0 * h)
        acc = u[i] < log_acc
        t = torch.where(acc, t_new, t)
        rho = torch.where(acc, rho_new, rho)
    return t, rho


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
