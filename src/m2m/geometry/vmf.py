"""von Mises-Fisher (vMF) mathematics on the unit sphere S^{d-1} in R^d (torch, any device).

Density: f(x; mu, kappa) = C_d(kappa) exp(kappa mu.x) with
C_d(kappa) = kappa^{d/2-1} / ((2 pi)^{d/2} I_{d/2-1}(kappa)) and mean resultant length
A_d(kappa) = E[mu.x] = I_{d/2}(kappa) / I_{d/2-1}(kappa).

The Bessel functions are evaluated in log space: the uniform (Debye) asymptotic expansion at orders
>= 40 and the stable downward recurrence of ratios I_{k+1}/I_k below that, so nothing under- or
overflows for d up to thousands and kappa up to 1e10 (scipy's ``ive`` returns NaN already at
d = 1024, kappa ~ 84). Accuracy is ~1e-12 relative over d in [2, 4096], kappa in [1e-3, 1e6]
(tests/geometry/test_vmf_math.py checks 1e-9 against mpmath).

Inputs may be python numbers or tensors; results are float64 unless a floating tensor was passed,
in which case they keep its dtype and device. The arithmetic is always float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m2m.errors import ConfigError, InvalidEmbeddingError, NumericalError
from m2m.geometry.noise import HostNoise
from m2m.geometry.sphere import normalize, random_point_at_cosine

__all__ = [
    "KAPPA_MAX",
    "estimate_kappa",
    "kappa_from_mean_resultant",
    "log_bessel_iv",
    "log_normalizer",
    "mean_resultant_length",
    "sample",
    "sample_cosine",
    "standard_gamma",
]

KAPPA_MAX = 1e10
"""Largest concentration the estimators return (a set of identical vectors has an infinite MLE).

At d = 640, kappa = 1e10 means 1 - E[mu.x] ~ 3e-8, the resolution of a float32 cosine."""

_NU_MIN = 40.0          # orders at and above this use the Debye expansion directly
_NEWTON_STEPS = 8
_WOOD_MAX_ROUNDS = 100
_WOOD_DRAWS = 4          # candidates per pending entry in rounds after the first (acceptance >~ 0.5)
_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# argument handling
# --------------------------------------------------------------------------------------------

def _out_dtype(*values: object) -> torch.dtype:
    for v in values:
        if isinstance(v, Tensor) and v.is_floating_point():
            return v.dtype
    return torch.float64


def _device(*values: object) -> torch.device:
    for v in values:
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")


def _f64(v: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(device=device, dtype=torch.float64)
    return torch.as_tensor(v, dtype=torch.float64, device=device)


def _check_dim(dim: int | Tensor) -> None:
    if isinstance(dim, Tensor):
        if bool((dim < 2).any()):
            raise ConfigError(f"dim must be >= 2, got {dim.min().item()}")
    elif isinstance(dim, bool) or not isinstance(dim, (int, float)) or dim < 2 or dim != int(dim):
        raise ConfigError(f"dim must be an int >= 2, got {dim!r}")


def _check_kappa(kappa: Tensor) -> None:
    bad = ~((kappa >= 0) & torch.isfinite(kappa))
    if bool(bad.any()):
        first = int(torch.nonzero(bad.reshape(-1))[0])
        raise ConfigError(f"kappa must be finite and >= 0, got {kappa.reshape(-1)[first].item()!r} "
                          f"(flat index {first})")


# --------------------------------------------------------------------------------------------
# Bessel functions in log space
# --------------------------------------------------------------------------------------------

def _debye_series(nu: Tensor, t: Tensor) -> Tensor:
    """log(sum_{k=0..5} u_k(t) / nu^k), the Debye correction factor of I_nu (DLMF 10.41.10)."""
    t2 = t * t
    u1 = t * (3.0 - 5.0 * t2) / 24.0
    u2 = t2 * (81.0 + t2 * (-462.0 + t2 * 385.0)) / 1152.0
    u3 = t * t2 * (30375.0 + t2 * (-369603.0 + t2 * (765765.0 - t2 * 425425.0))) / 414720.0
    u4 = t2 * t2 * (4465125.0 + t2 * (-94121676.0 + t2 * (349922430.0 + t2 * (-446185740.0
                                                                          + t2 * 185910725.0))))
    u4 = u4 / 39813120.0
    u5 = t * t2 * t2 * (1519035525.0 + t2 * (-49286948607.0 + t2 * (284499769554.0 + t2 * (
        -614135872350.0 + t2 * (566098157625.0 - t2 * 188699385875.0)))))
    u5 = u5 / 6688604160.0
    inv = 1.0 / nu
    corr = inv * (u1 + inv * (u2 + inv * (u3 + inv * (u4 + inv * u5))))
    return torch.log1p(corr)


def _debye(nu: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log I_nu(x), log(I_{nu+1}(x) / I_nu(x))) by the uniform asymptotic expansion; nu >= 40, x > 0.

    The ratio is assembled from differences written without cancellation, so it is accurate to
    ~1e-16 absolute even where log I_nu(x) itself is ~1e6.
    """
    s = torch.sqrt(nu * nu + x * x)                       # nu * sqrt(1 + z^2), z = x / nu
    logx = torch.log(x)
    log_iv = s + nu * (logx - torch.log(nu + s)) - 0.5 * (_LOG_2PI + torch.log(s)) + _debye_series(nu, nu / s)
    nu1 = nu + 1.0
    s1 = torch.sqrt(nu1 * nu1 + x * x)
    ds = (2.0 * nu + 1.0) / (s1 + s)                      # s1 - s
    log_ratio = (ds + (logx - torch.log(nu1 + s1)) - nu * torch.log1p((1.0 + ds) / (nu + s))
                 - 0.5 * torch.log1p(ds / s) + _debye_series(nu1, nu1 / s1) - _debye_series(nu, nu / s))
    return log_iv, log_ratio


def _log_iv_and_ratio(nu: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log I_nu(x), log R, 1 - R) with R = I_{nu+1}(x) / I_nu(x); float64 tensors, nu >= 0, x >= 0.

    Orders below 40 are shifted up by an integer m, evaluated by Debye there, and brought down with
    the recurrence R_k = 1 / (2(k+1)/x + R_{k+1}), which is stable in the downward direction.
    """
    nu, x = torch.broadcast_tensors(nu, x)
    zero = x <= 0
    xs = torch.where(zero, torch.ones_like(x), x)
    shift = torch.clamp(torch.ceil(_NU_MIN - nu), min=0.0)
    top = nu + shift
    log_iv, log_r = _debye(top, xs)
    r = torch.exp(log_r)
    e = -torch.expm1(log_r)                               # 1 - R, kept separately for R near 1
    steps = int(shift.max().item()) if shift.numel() else 0
    for i in range(steps):
        k = top - 1.0 - i
        active = shift > i
        q = 2.0 * (k + 1.0) / xs
        den = q + r
        r_new = 1.0 / den
        e_new = (q - e) / den
        log_iv = torch.where(active, log_iv + torch.log(den), log_iv)
        r = torch.where(active, r_new, r)
        e = torch.where(active, e_new, e)
    log_r = torch.log(r)
    # x = 0: I_0(0) = 1, I_nu(0) = 0 for nu > 0, and the ratio is 0.
    log_iv = torch.where(zero, torch.where(nu == 0, torch.zeros_like(x), torch.full_like(x, -math.inf)), log_iv)
    log_r = torch.where(zero, torch.full_like(x, -math.inf), log_r)
    e = torch.where(zero, torch.ones_like(x), e)
    return log_iv, log_r, e


def log_bessel_iv(nu: float | Tensor, x: float | Tensor) -> Tensor:
    """log I_nu(x), the modified Bessel function of the first kind, for nu >= 0 and x >= 0.

    Broadcasts ``nu`` against ``x``; stable where I_nu(x) under- or overflows float64.
    """
    dev = _device(x, nu)
    nu_t, x_t = _f64(nu, dev), _f64(x, dev)
    if bool((nu_t < 0).any()) or bool((x_t < 0).any()) or not bool(torch.isfinite(x_t).all()):
        raise ConfigError("log_bessel_iv needs nu >= 0 and finite x >= 0")
    out, _, _ = _log_iv_and_ratio(nu_t, x_t)
    return out.to(_out_dtype(x, nu))


def _mrl_f64(kappa: Tensor, dim: float | Tensor) -> tuple[Tensor, Tensor]:
    """(A_d(kappa), 1 - A_d(kappa)) in float64."""
    nu = _f64(dim, kappa.device) / 2.0 - 1.0
    _, log_r, e = _log_iv_and_ratio(nu, kappa)
    return torch.exp(log_r), e


def mean_resultant_length(kappa: float | Tensor, dim: int | Tensor) -> Tensor:
    """A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa): the mean cosine E[mu.x] under vMF(mu, kappa)."""
    _check_dim(dim)
    k = _f64(kappa, _device(kappa))
    _check_kappa(k)
    a, _ = _mrl_f64(k, dim)
    return a.to(_out_dtype(kappa))


def log_normalizer(kappa: float | Tensor, dim: int | Tensor) -> Tensor:
    """log C_d(kappa) = (d/2-1) log kappa - (d/2) log(2 pi) - log I_{d/2-1}(kappa).

    At kappa = 0 it is minus the log area of the sphere, log Gamma(d/2) - log 2 - (d/2) log pi.
    """
    _check_dim(dim)
    k = _f64(kappa, _device(kappa))
    _check_kappa(k)
    d = _f64(dim, k.device)
    nu = d / 2.0 - 1.0
    log_iv, _, _ = _log_iv_and_ratio(nu, k)
    safe = torch.where(k > 0, k, torch.ones_like(k))
    val = nu * torch.log(safe) - (d / 2.0) * _LOG_2PI - log_iv
    uniform = torch.lgamma(d / 2.0) - math.log(2.0) - (d / 2.0) * math.log(math.pi)
    val = torch.where(k > 0, val, uniform)
    return val.to(_out_dtype(kappa))


# --------------------------------------------------------------------------------------------
# concentration estimation
# --------------------------------------------------------------------------------------------

def kappa_from_mean_resultant(rbar: float | Tensor, dim: int | Tensor, *,
                              one_minus_rbar: float | Tensor | None = None) -> Tensor:
    """The kappa with A_d(kappa) = rbar: the vMF maximum-likelihood concentration for a set whose
    mean resultant length is ``rbar`` (vectorised over ``rbar``).

    Starts from Banerjee et al. (2005), kappa0 = rbar (d - rbar^2) / (1 - rbar^2), and refines with
    Newton steps on log A (rbar <= 1/2) or log(1 - A) (rbar > 1/2) as functions of log kappa, which
    are nearly linear there (Sra 2012 refines kappa0 the same way). Pass ``one_minus_rbar`` when
    1 - rbar is known more precisely than rbar (tight sets). rbar = 0 gives 0; the result is capped
    at ``KAPPA_MAX`` (rbar = 1 is an infinite MLE).
    """
    _check_dim(dim)
    dev = _device(rbar, one_minus_rbar)
    r = _f64(rbar, dev)
    if not bool(torch.isfinite(r).all()) or bool((r < 0).any()) or bool((r > 1.0 + 1e-6).any()):
        bad = ~(torch.isfinite(r) & (r >= 0) & (r <= 1.0 + 1e-6))
        first = int(torch.nonzero(bad.reshape(-1))[0])
        raise ConfigError(f"rbar must be in [0, 1], got {r.reshape(-1)[first].item()!r} (flat index {first})")
    r = torch.clamp(r, max=1.0)
    e = torch.clamp(1.0 - r, min=0.0) if one_minus_rbar is None else torch.clamp(_f64(one_minus_rbar, dev), min=0.0)
    r, e = torch.broadcast_tensors(r, e)
    d = _f64(dim, dev)
    e = torch.maximum(e, (d - 1.0) / (2.0 * KAPPA_MAX))   # cap the concentration
    pos = r > 0
    rs = torch.where(pos, r, torch.full_like(r, 0.5))
    one_m_r2 = e * (2.0 - e)
    kappa = rs * (d - rs * rs) / one_m_r2
    u = torch.log(kappa)
    small = rs <= 0.5
    target = torch.where(small, torch.log(rs), torch.log(e))
    for _ in range(_NEWTON_STEPS):
        k = torch.exp(u)
        a, ea = _mrl_f64(k, d)
        da = ea * (2.0 - ea) - (d - 1.0) * a / k           # A'(kappa) = 1 - A^2 - (d-1) A / kappa
        f = torch.where(small, torch.log(a), torch.log(ea)) - target
        fp = torch.where(small, k * da / a, -k * da / ea)  # d f / d log kappa
        fp = torch.where(torch.abs(fp) > 1e-300, fp, torch.full_like(fp, 1e-300))
        step = torch.clamp(f / fp, min=-1.0, max=1.0)
        u = u - step
    kappa = torch.clamp(torch.exp(u), max=KAPPA_MAX)
    kappa = torch.where(pos, kappa, torch.zeros_like(kappa))
    return kappa.to(_out_dtype(rbar))


def estimate_kappa(unit_vectors: Tensor) -> Tensor:
    """vMF maximum-likelihood concentration of a set of vectors: [n, d] -> scalar, [..., n, d] -> [...].

    Rows are normalised first (float64); needs n >= 2. Uses the mean resultant length
    rbar = |mean of rows|, with 1 - rbar^2 computed as the mean squared deviation from the mean
    (exact for unit rows and precise for tight sets), then ``kappa_from_mean_resultant``.
    Note the small-sample upward bias of rbar (see ``m2m.geometry.kappa``).
    """
    if not isinstance(unit_vectors, Tensor):
        unit_vectors = torch.as_tensor(unit_vectors)
    if unit_vectors.dim() < 2 or unit_vectors.shape[-2] < 2 or unit_vectors.shape[-1] < 2:
        raise InvalidEmbeddingError(f"estimate_kappa needs [..., n >= 2, d >= 2] vectors, got shape "
                                    f"{tuple(unit_vectors.shape)}")
    v = normalize(unit_vectors.to(torch.float64), name="estimate_kappa input")
    mean = v.mean(dim=-2)
    rbar = torch.linalg.vector_norm(mean, dim=-1)
    q = (v - mean.unsqueeze(-2)).square().sum(-1).mean(-1)  # = 1 - rbar^2 for unit rows
    e = q / (1.0 + rbar)
    kappa = kappa_from_mean_resultant(torch.clamp(rbar, max=1.0), v.shape[-1], one_minus_rbar=e)
    return kappa.to(unit_vectors.dtype if unit_vectors.is_floating_point() else torch.float64)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------

def standard_gamma(shape: float, size: tuple[int, ...], generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> Tensor:
    """Exact Gamma(shape, 1) draws of the given ``size`` for one scalar shape > 0.

    Marsaglia & Tsang (2000) rejection, vectorised (two candidates per entry and round for small
    shapes, where the acceptance is >= 0.95, one for shapes >= 30, where it is > 0.9999); shapes
    below 1 use Gamma(a) = Gamma(a + 1) U^(1/a). Much faster than ``torch._standard_gamma`` on CPU.
    """
    if not shape > 0:
        raise ConfigError(f"gamma shape must be > 0, got {shape!r}")
    boost = shape < 1.0
    a = shape + 1.0 if boost else shape
    dd = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * dd)
    draws = 1 if a >= 30.0 else 2          # acceptance ~1 - 0.002 / a: one candidate is enough for large a
    total = math.prod(size)
    dev = torch.device(device)
    # small-array arithmetic: numpy on the CPU (views of the torch draws), torch elsewhere
    cpu = dev.type == "cpu"
    xp = np if cpu else torch

    def draw(fn: Any, m: int) -> Any:
        t = fn((draws, m), dtype=dtype, device=dev, generator=generator)
        return t.numpy() if cpu else t

    out = xp.empty(total, dtype=np.dtype(str(dtype).replace("torch.", ""))) if cpu else \
        torch.empty(total, dtype=dtype, device=dev)
    pending: Any = None
    for _ in range(_WOOD_MAX_ROUNDS):
        m = total if pending is None else len(pending)
        if m == 0:
            break
        x = draw(torch.randn, m)
        u = draw(torch.rand, m)
        v = 1.0 + c * x
        v = v * v * v
        vs = xp.where(v > 0, v, 1.0)
        ok = (v > 0) & (xp.log(u) < 0.5 * x * x + dd - dd * v + dd * xp.log(vs))
        cand = dd * v
        if draws == 1:
            val, done = cand[0], ok[0]
        else:
            val = xp.where(ok[0], cand[0], cand[1])
            done = ok[0] | ok[1]
        if pending is None:
            out[:] = val
            pending = np.flatnonzero(~done) if cpu else torch.nonzero(~done).squeeze(1)
        else:
            out[pending[done]] = val[done]
            pending = pending[~done]
    if pending is None or len(pending):
        raise NumericalError(f"gamma sampler did not accept all draws (shape {shape})")
    res = torch.from_numpy(out) if cpu else out
    if boost:
        res = res * torch.rand(total, dtype=dtype, device=dev, generator=generator) ** (1.0 / shape)
    return res.reshape(size)


def sample_cosine(kappa: Tensor, dim: int, n: int = 1,
                  generator: "torch.Generator | HostNoise | None" = None) -> tuple[Tensor, Tensor]:
    """Exact draws of w = mu.x for x ~ vMF(mu, kappa) by Wood's (1994) rejection sampler.

    ``kappa`` [B] (float64 arithmetic) -> (w, sqrt(1 - w^2)), each [B, n] float64. Uses the stable
    b = (d-1) / (2 kappa + sqrt(4 kappa^2 + (d-1)^2)) and carries 1 - w, so kappa up to 1e10 and d
    up to thousands lose no precision. Vectorised: each round redraws only the rejected entries.
    """
    dev = kappa.device
    # small-array arithmetic: numpy on the CPU (views of the torch draws), torch elsewhere
    cpu = dev.type == "cpu"
    xp = np if cpu else torch
    k: Any
    if cpu:
        k = np.repeat(kappa.detach().numpy().astype(np.float64, copy=False).reshape(-1), n)
        k_t = torch.from_numpy(k)
    else:
        k_t = kappa.to(torch.float64).reshape(-1, 1).expand(-1, n).reshape(-1).contiguous()
        k = k_t
    d1 = float(dim - 1)
    b = d1 / (2.0 * k + xp.sqrt(4.0 * k * k + d1 * d1))
    om_x0 = 2.0 * b / (1.0 + b)                              # 1 - x0, x0 = (1-b)/(1+b)
    x0 = (1.0 - b) / (1.0 + b)
    log_1mx02 = xp.log(4.0 * b) - 2.0 * xp.log1p(b)          # log(1 - x0^2)
    total = k_t.numel()
    omw = xp.empty_like(k)
    # on the CPU the candidates come from one numpy stream seeded from the generator (HostNoise)
    host = HostNoise.of(generator) if cpu and total else None
    gen = generator.torch_generator(dev) if isinstance(generator, HostNoise) and host is None else generator
    z: Any
    u: Any
    pending: Any = None
    for _ in range(_WOOD_MAX_ROUNDS):
        m = total if pending is None else len(pending)
        if m == 0:
            break
        # one candidate per entry in the first round (Wood's acceptance is high, so most entries are
        # done), then _WOOD_DRAWS per pending entry; the first accepted one is kept
        nd = 1 if pending is None else _WOOD_DRAWS
        if host is not None:
            # numpy's Beta (two Marsaglia-Tsang gammas in C) and uniforms: no per-round Python arithmetic
            z = host.rng.beta(d1 / 2.0, d1 / 2.0, (nd, m))  # Beta((d-1)/2, (d-1)/2)
            u = host.rng.random((nd, m))
        else:
            # gen is a torch.Generator on this branch (host is None); the union is not narrowed
            g = standard_gamma(d1 / 2.0, (2, nd, m), gen, dev)  # type: ignore[arg-type]
            # gen is a torch.Generator on this branch (host is None); the union is not narrowed
            u = torch.rand((nd, m), dtype=torch.float64, device=dev, generator=gen)  # type: ignore[arg-type]
            z = g[0] / (g[0] + g[1])                          # Beta((d-1)/2, (d-1)/2)
        first = pending is None
        bp = b if first else b[pending]
        kp = k if first else k[pending]
        omx0p = om_x0 if first else om_x0[pending]
        x0p = x0 if first else x0[pending]
        l1p = log_1mx02 if first else log_1mx02[pending]
        omw_c = 2.0 * bp * z / (1.0 - (1.0 - bp) * z)          # 1 - w
        lhs = kp * (omx0p - omw_c) + d1 * (xp.log(omx0p + x0p * omw_c) - l1p)
        acc = lhs >= xp.log(u)
        chosen = omw_c[-1]
        for j in range(nd - 2, -1, -1):                          # the first accepted candidate
            chosen = xp.where(acc[j], omw_c[j], chosen)
        done = acc.any(0)
        if first:
            omw[:] = chosen
            pending = np.flatnonzero(~done) if cpu else torch.nonzero(~done).squeeze(1)
        else:
            omw[pending[done]] = chosen[done]
            pending = pending[~done]
    if pending is None or len(pending):
        left = total if pending is None else len(pending)
        raise NumericalError(f"Wood's vMF sampler did not accept {left} draws in {_WOOD_MAX_ROUNDS} rounds "
                           f"(kappa in [{k_t.min().item()}, {k_t.max().item()}], d={dim})")
    if cpu:
        return (torch.from_numpy((1.0 - omw).reshape(-1, n)),
                torch.from_numpy(np.sqrt(np.maximum(omw * (2.0 - omw), 0.0)).reshape(-1, n)))
    w = (1.0 - omw).reshape(-1, n)
    s = torch.sqrt(torch.clamp(omw * (2.0 - omw), min=0.0)).reshape(-1, n)
    return w, s


def sample(mu: Tensor, kappa: float | Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Exact vMF(mu, kappa) samples (Wood 1994 for mu.x, uniform orthogonal direction).

    ``mu`` [d] with scalar ``kappa`` -> [n, d]; ``mu`` [B, d] with ``kappa`` [B] -> [B, n, d].
    Rows of ``mu`` are normalised; the result has ``mu``'s dtype and device (use a ``generator`` on
    that device). kappa = 0 gives uniform points on the sphere.
    """
    if not isinstance(mu, Tensor):
        mu = torch.as_tensor(mu, dtype=torch.float32)
    if not mu.is_floating_point():
        mu = mu.to(torch.float32)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be an int >= 1, got {n!r}")
    single = mu.dim() == 1
    if mu.dim() not in (1, 2) or mu.shape[-1] < 2:
        raise InvalidEmbeddingError(f"mu must be [d] or [B, d] with d >= 2, got shape {tuple(mu.shape)}")
    mu2 = mu.unsqueeze(0) if single else mu
    k = _f64(kappa, mu.device).reshape(-1)
    if k.numel() == 1 and mu2.shape[0] != 1:
        k = k.expand(mu2.shape[0])
    if k.numel() != mu2.shape[0]:
        raise ConfigError(f"kappa must have one value per mean direction ({mu2.shape[0]}), got {k.numel()}")
    _check_kappa(k)
    mu2 = normalize(mu2, name="mu")
    d = mu2.shape[-1]
    w, s = sample_cosine(k, d, n, generator)
    base = mu2.unsqueeze(1).expand(-1, n, -1)
    out = random_point_at_cosine(base, w, s, generator=generator, out=torch.empty_like(base))
    return out[0] if single else out
