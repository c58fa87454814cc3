"""Maps on the unit sphere S^{d-1} in R^d: normalisation, tangent projection, retractions.

All functions are batched over leading dimensions, work on any device and keep the input dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from m2m.errors import InvalidEmbeddingError
from m2m.geometry.noise import Source, normal_

_EXPLICIT_PERP_DIM = 64

__all__ = [
    "exp_map",
    "normalize",
    "project_tangent",
    "random_point_at_cosine",
    "retract",
    "uniform_tangent_direction",
]


def normalize(x: Tensor, dim: int = -1, eps: float = 0.0, name: str = "x") -> Tensor:
    """Rows of ``x`` scaled to unit Euclidean norm along ``dim``.

    Raises InvalidEmbeddingError naming ``name`` and the first bad (flat) row when a row holds NaN
    or Inf, or has norm <= ``eps`` (zero rows have no direction).
    """
    norms = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    for bad, what in ((~torch.isfinite(norms), "contains NaN or Inf"), (~(norms > eps), f"has norm <= {eps}")):
        if bool(bad.any()):
            first = int(torch.nonzero(bad.reshape(-1))[0])
            raise InvalidEmbeddingError(f"{name} {what} (first at flat row {first})")
    return x / norms


def project_tangent(x: Tensor, v: Tensor) -> Tensor:
    """Projection of ``v`` onto the tangent space of the sphere at the unit vector ``x``: v - (x.v) x."""
    return v - (x * v).sum(-1, keepdim=True) * x


def retract(x: Tensor, v: Tensor) -> Tensor:
    """Projection retraction R_x(v) = (x + v) / |x + v| for a tangent vector ``v`` at ``x``.

    This is the gnomonic (central) map from the tangent plane: it reaches the open hemisphere around
    ``x`` and its Jacobian is (x.R_x(v))^{-d}, symmetric in the two points.
    """
    y = x + v
    return y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)


def exp_map(x: Tensor, v: Tensor) -> Tensor:
    """Riemannian exponential map: cos(|v|) x + sin(|v|) v/|v| for a tangent vector ``v`` at ``x``."""
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    # sin(n)/n is 1 at n = 0; torch.sinc(z) = sin(pi z)/(pi z).
    y = torch.cos(n) * x + torch.sinc(n / torch.pi) * v
    return y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)


def uniform_tangent_direction(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A unit vector drawn uniformly from the unit sphere of the tangent space at each row of ``x``."""
    z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    u = project_tangent(x, z)
    return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)


def random_point_at_cosine(
    mu: Tensor, cos: Tensor, sin: Tensor | None = None, generator: Source = None,
    out: Tensor | None = None, scratch: Tensor | None = None, gaussian: Tensor | None = None,
    unit: bool = True,
) -> Tensor:
    """Unit vectors x = cos * mu + sin * u, with u uniform on the unit sphere orthogonal to ``mu``.

    ``mu`` is [..., d] (unit rows); ``cos`` and ``sin`` are [...] (``sin`` defaults to
    sqrt(1 - cos^2); pass it when it is known more precisely than 1 - cos^2). Exact in law: the
    orthogonal direction is a normalised Gaussian projected off ``mu`` (``m2m.geometry.noise.normal_``).
    Costs one Gaussian draw of the shape of ``mu`` and three passes over it. ``out`` (shape of
    ``mu``) receives the result, allocated when not given; ``scratch`` (same shape) is a temporary
    for d <= 64, allocated when not given. ``gaussian``: N(0, I) draws of ``mu``'s shape drawn earlier
    (e.g. in a prefetch thread); they are used instead of drawing (and overwritten with the result).
    ``unit=False``: the rows of ``mu`` are unit only to their storage precision (a float16 lake's rows
    read as float32, |mu| = 1 +- ~1e-4): they are normalised first (two more passes), so the result is
    unit to its own precision.
    """
    if not unit:
        mu = mu / torch.linalg.vector_norm(mu, dim=-1, keepdim=True).clamp_min(torch.finfo(mu.dtype).tiny)
    cos = cos.to(mu.dtype)
    if sin is None:
        sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=0.0))
    sin = sin.to(mu.dtype)
    if gaussian is not None:
        if gaussian.shape != mu.shape or gaussian.dtype != mu.dtype or gaussian.device != mu.device:
            raise InvalidEmbeddingError(f"gaussian must match mu ({mu.dtype} {tuple(mu.shape)} on {mu.device}), "
                                        f"got {gaussian.dtype} {tuple(gaussian.shape)} on {gaussian.device}")
        z = gaussian
    else:
        z = out if out is not None else torch.empty_like(mu)
        normal_(z, generator)
    if scratch is not None and _shares_memory(scratch, z, mu):
        scratch = None  # a temporary that is also an input or the output would overwrite it
    if mu.shape[-1] <= _EXPLICIT_PERP_DIM:
        # few dimensions: z can be nearly parallel to mu, so form z - (z.mu) mu explicitly, twice: once
        # left a part along mu as large as the rest when z was (d = 2: rows 1 +- 4e-4 instead of 1e-7)
        for _ in range(2):
            dot = (z * mu).sum(-1) if scratch is None else torch.mul(z, mu, out=scratch).sum(-1)
            z.sub_(mu * dot.unsqueeze(-1))
        perp = torch.clamp(torch.linalg.vector_norm(z, dim=-1), min=torch.finfo(mu.dtype).tiny)
        scale, coef = sin / perp, cos
    elif _host_rows(z, mu, cos, sin):
        # all in numpy, which runs each pass in this thread: torch would split the [B, d] passes over
        # its intra-op threads, which on a busy machine wait for each other (docs/geometry.md)
        scale, coef = _host_coefficients(z, mu, cos, sin)
        tmp_t = (scratch if scratch is not None and scratch.shape == z.shape and scratch.dtype == z.dtype
                 and scratch.is_contiguous() else torch.empty_like(z))
        if torch.get_num_threads() == 1:
            # the same three IEEE operations in torch, whose broadcast passes measured 0.6x numpy's
            # (docs/geometry.md); only where they stay on this thread
            torch.mul(z, scale.unsqueeze(-1), out=z)
            torch.mul(mu, coef.unsqueeze(-1), out=tmp_t)
            return z.add_(tmp_t)
        zn = z.numpy().reshape(-1, mu.shape[-1])
        tmp = tmp_t.numpy().reshape(zn.shape)
        np.multiply(zn, scale.numpy().reshape(-1, 1), out=zn)
        np.multiply(mu.numpy().reshape(zn.shape), coef.numpy().reshape(-1, 1), out=tmp)
        np.add(zn, tmp, out=zn)
        return z
    else:
        dot = torch.linalg.vecdot(z, mu)                    # z . mu
        zn = torch.linalg.vector_norm(z, dim=-1)          # |z|^2 ~ d, so |z|^2 - (z.mu)^2 keeps its digits
        perp = torch.clamp(torch.sqrt(torch.clamp(zn * zn - dot * dot, min=0.0)), min=torch.finfo(mu.dtype).tiny)
        scale = sin / perp
        coef = cos - scale * dot
    # x = scale * z + coef * mu  ==  cos * mu + sin * (z - (z.mu) mu) / |z - (z.mu) mu|
    z.mul_(scale.unsqueeze(-1))
    z.addcmul_(mu, coef.unsqueeze(-1))
    return z


def _shares_memory(t: Tensor, *others: Tensor) -> bool:
    """Whether ``t``'s storage is that of one of ``others``."""
    ptr = t.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == ptr for o in others)


def _host_rows(z: Tensor, mu: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether the CPU (numpy) path applies: contiguous CPU tensors of one float dtype."""
    return (z.device.type == "cpu" and mu.device.type == "cpu" and cos.device.type == "cpu"
            and sin.device.type == "cpu" and z.dtype in (torch.float32, torch.float64)
            and mu.dtype == z.dtype and mu.shape == z.shape and mu.is_contiguous() and z.is_contiguous())


def _host_coefficients(z: Tensor, mu: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, coef) of ``random_point_at_cosine`` for CPU rows, with numpy's row-wise matmul for the
    dot products (one pass each, a fraction of torch's per-operation cost for [B]-sized arithmetic)."""
    d = z.shape[-1]
    zn = z.numpy().reshape(-1, 1, d)
    mn = mu.numpy().reshape(-1, d, 1)
    dot = np.matmul(zn, mn).reshape(-1)                               # z . mu
    sq = np.matmul(zn, zn.reshape(-1, d, 1)).reshape(-1)             # |z|^2 ~ d: |z|^2 - (z.mu)^2 keeps its digits
    perp = np.sqrt(np.maximum(sq - dot * dot, 0.0))
    np.maximum(perp, np.finfo(perp.dtype).tiny, out=perp)
    lead = z.shape[:-1]
    c = (cos.numpy() if cos.shape == lead else np.broadcast_to(cos.numpy(), lead)).reshape(-1)
    scale = (sin.numpy() if sin.shape == lead else np.broadcast_to(sin.numpy(), lead)).reshape(-1) / perp
    coef = c - scale * dot
    return torch.from_numpy(scale.reshape(lead)), torch.from_numpy(coef.reshape(lead))
