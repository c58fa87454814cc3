"""Per-splat concentration from its nearest neighbours (the lake calls this after a kNN search).

Estimator. Splat i's kappa is the vMF maximum-likelihood concentration of the m unit vectors made of
mu_i (``include_self``) and its valid neighbours: with the set's mean v_bar, rbar = |v_bar| and
kappa = A_d^{-1}(rbar) (``m2m.vmf.kappa_from_mean_resultant``). The spread is computed as the
variance 1 - rbar^2 = (1/m) sum_i |v_i - v_bar|^2 (exact for unit vectors), with the vectors
centred on mu_i first, so tight sets keep their digits in float32.

Small-sample bias. For m draws from vMF(mu, kappa) with A = A_d(kappa),
E[rbar^2] = A^2 + (1 - A^2) / m: rbar is biased upward, strongly so for diffuse sets (m = 17 uniform
vectors give rbar ~ 0.24, i.e. kappa ~ 165 at d = 640 instead of 0) and by a few percent in kappa for
realistic neighbourhoods (A ~ 0.9). ``bias_correction=True`` (the default) inverts the unbiased
estimate of A^2 instead, A^2_hat = (m rbar^2 - 1) / (m - 1), i.e. it scales the variance
1 - rbar^2 by m / (m - 1) (Bessel's correction); a set no tighter than chance then gets kappa = 0.
kNN neighbours are the *closest* points, so they are more concentrated than draws from the local
density: the estimate stays biased upward even after the correction.

Rows with fewer than two points (no valid neighbour and ``include_self``, or none at all) get NaN.
A neighbour entry equal to the row itself is ignored (faiss returns the query as its own hit).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from m2m.errors import ConfigError, InvalidEmbeddingError
from m2m.geometry.vmf import kappa_from_mean_resultant

__all__ = ["neighbourhood_kappa"]

log = logging.getLogger(__name__)

_DEFAULT_CHUNK_BYTES = 8 << 20   # small temporaries are reused by the allocator: no page faults


def neighbourhood_kappa(
    mu: np.ndarray | Tensor,
    neighbors: np.ndarray | Tensor,
    include_self: bool = True,
    chunk: int | None = None,
    bias_correction: bool = True,
    rows: int | None = None,
) -> np.ndarray:
    """kappa of every splat from itself and its k nearest neighbours: [N, d], [N, k] -> float32 [N].

    With ``rows`` = Q, only the first Q rows' kappa is computed: ``neighbors`` is ``[Q, k]`` and
    indexes all N rows (those after Q are neighbours only): float32 [Q].

    Args:
        mu: unit vectors (float32/float16/float64 numpy array or tensor, any device; computed there).
        neighbors: int64 row positions into ``mu``, -1 for a missing neighbour.
        include_self: count mu_i itself in its set (m = 1 + valid neighbours).
        chunk: rows per vectorised step (default: ~8 MiB of gathered neighbours).
        bias_correction: invert the unbiased estimate of A^2 (see the module docstring).
        rows: estimate the first ``rows`` rows only (see above; default all).
    """
    mu_t = torch.as_tensor(mu) if not isinstance(mu, Tensor) else mu
    if mu_t.dim() != 2 or mu_t.shape[1] < 2:
        raise InvalidEmbeddingError(f"mu must be [N, d] with d >= 2, got shape {tuple(mu_t.shape)}")
    if not mu_t.is_floating_point():
        raise InvalidEmbeddingError(f"mu must be floating point, got {mu_t.dtype}")
    n, d = mu_t.shape
    nb = torch.as_tensor(neighbors) if not isinstance(neighbors, Tensor) else neighbors
    q = n if rows is None else rows
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 0 <= q <= n:
        raise ConfigError(f"rows must be an int in [0, {n}], got {rows!r}")
    q = int(q)
    if nb.dim() != 2 or nb.shape[0] != q:
        raise ConfigError(f"neighbors must be [{'N' if rows is None else 'rows'}={q}, k], got shape {tuple(nb.shape)}")
    if nb.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"neighbors must be int64 row positions, got {nb.dtype}")
    k = nb.shape[1]
    if q and k and (int(nb.min()) < -1 or int(nb.max()) >= n):
        bad = int(torch.nonzero(((nb < -1) | (nb >= n)).any(1))[0])
        raise ConfigError(f"neighbors holds positions outside [-1, {n}) (first at row {bad})")
    if chunk is None:
        chunk = max(1, _DEFAULT_CHUNK_BYTES // max(1, (k + 1) * d * 4))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk must be an int >= 1, got {chunk!r}")

    dev = mu_t.device
    work = torch.float64 if mu_t.dtype == torch.float64 else torch.float32
    nb = nb.to(device=dev, dtype=torch.int64)
    var = torch.empty(q, dtype=torch.float64, device=dev)
    count = torch.empty(q, dtype=torch.float64, device=dev)
    buf = torch.empty(min(chunk, q) * k, d, dtype=mu_t.dtype, device=dev)
    for start in range(0, q, chunk):
        stop = min(q, start + chunk)
        c = stop - start
        at = torch.arange(start, stop, device=dev)
        idx = nb[start:stop]
        valid = (idx >= 0) & (idx != at.unsqueeze(1))
        # missing neighbours point at the row itself, so they add 0 to the centred sums below
        idx = torch.where(valid, idx, at.unsqueeze(1))
        nbr = torch.index_select(mu_t, 0, idx.reshape(-1), out=buf[: c * k]).view(c, k, d)
        own = mu_t[start:stop]
        if nbr.dtype != work:
            nbr = nbr.to(work)
            own = own.to(work)
        u = nbr.sub_(own.unsqueeze(1))                          # centred on mu_i (variance is shift-free)
        m = valid.sum(1).to(torch.float64) + (1.0 if include_self else 0.0)
        ss = torch.linalg.vector_norm(u, dim=(1, 2)).to(torch.float64) ** 2   # sum |u_j|^2 (u_self = 0)
        s = u.sum(1).to(torch.float64)                          # sum u_j
        m_safe = torch.clamp(m, min=1.0)
        var[start:stop] = (ss - s.square().sum(1) / m_safe) / m_safe   # (1/m) sum |v_j - v_bar|^2 = 1 - rbar^2
        count[start:stop] = m
    var = torch.clamp(var, min=0.0, max=1.0)
    m_safe = torch.clamp(count, min=1.0)
    if bias_correction:
        var = torch.clamp(var * m_safe / torch.clamp(m_safe - 1.0, min=1.0), max=1.0)
    rbar = torch.sqrt(1.0 - var)
    kappa = kappa_from_mean_resultant(rbar, d, one_minus_rbar=var / (1.0 + rbar))
    kappa = torch.where(count >= 2, kappa, torch.full_like(kappa, float("nan")))
    out = kappa.to(torch.float32).cpu().numpy()
    log.debug("neighbourhood_kappa: %d rows, k=%d, d=%d, chunk=%d", q, k, d, chunk)
    return out
