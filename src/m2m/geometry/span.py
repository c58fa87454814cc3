"""An orthonormal frame of the span of a few unit vectors per row, from their Gram matrix.

For means mu [B, K, d], ``span_frame`` returns L [B, K, K] lower triangular with mu_j = sum_l L_jl q_l
for orthonormal q_l (Cholesky of the float64 Gram matrix, i.e. Gram-Schmidt in the order given, so
q_0 = mu_0 / |mu_0|). A mean whose residual after the earlier ones has squared norm <= ``tol`` adds
no direction: its column of L is zero and ``kept`` is False there (duplicates, rank-deficient
spans, absent zero rows). Nothing in d is formed but the Gram matrix (one [K, d] x [d, K] product);
vectors of the frame are materialised only as combinations of the means (``combine``), so a row
costs O(K^2 d) once, not O(K d) per use. See docs/geometry.md.

Means given in float32 on the CPU (the lake's vectors) stay float32: the two products with them (``project_coords``,
``combine``) then run in float32 for the rows whose frame is well conditioned (``SpanFactor.float32_ok``:
the inverse of the factor, which scales the products' rounding, has infinity norm <= ``FLOAT32_INVERSE_LIMIT``)
and in float64 for the others: half the memory traffic of float64 means, at float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["FLOAT32_INVERSE_LIMIT", "SPAN_TOL", "SpanFactor", "SpanFrame", "exact_bmm", "span_factor", "span_frame"]

SPAN_TOL = 1e-12
"""Squared residual norm below which a mean adds no direction: its part outside the earlier means'
span is then below 1e-6, the size of a float32 unit vector's own rounding in d in the hundreds."""

FLOAT32_INVERSE_LIMIT = 64.0
"""Largest infinity norm of the inverse factor for which a row's products with float32 means run in
float32. The rounding of those products reaches the end point scaled by at most about this norm times
the (small) weight of the part outside the span; rows beyond it run in float64. Chosen from the rows the
demo lake reruns (inverse norms 10-28): float32 products moved the end point by at most 5.9e-8 per
coordinate against float64 ones (docs/tuning.md)."""


class SpanFactor(NamedTuple):
    """``span_factor``'s result: ``coords`` [B, K, K] float64 (the factor, zero columns where not
    kept), ``kept`` [B, K] bool, ``float32_ok`` [B] bool (products with float32 means may run in float32)."""

    coords: Tensor
    kept: Tensor
    float32_ok: Tensor


@dataclass
class SpanFrame:
    """``coords`` [B, K, K]: row j = coordinates of mu_j in the frame (zero columns where not kept);
    ``kept`` [B, K] bool; ``tri`` [B, K, K]: ``coords`` with 1 on the diagonal where not kept, so that
    mu = tri q' for the frame q' completed by the (tiny) residuals of the dropped means: solving with
    ``tri`` maps frame coordinates to mean coefficients. ``means`` [B, K, d] float64, or float32 with
    ``wide`` [W] the rows whose products must run in float64 (``rows64``; ``SpanFactor.float32_ok``)."""

    coords: Tensor
    kept: Tensor
    tri: Tensor
    means: Tensor
    wide: Tensor | None = None

    def combine(self, a: Tensor) -> Tensor:
        """sum_l a_l q_l for frame coordinates a [B, K] (zero where not kept): [B, d] in the means'
        dtype (float32 means: float32 products, rounded coefficients)."""
        c = torch.linalg.solve_triangular(self.tri.transpose(1, 2), a.unsqueeze(2), upper=True)
        return _bmv(c.transpose(1, 2).to(self.means.dtype), self.means).squeeze(1)

    def project_coords(self, g: Tensor) -> Tensor:
        """Frame coordinates q_l . g of vectors g [B, d] (zero where not kept): [B, K] float64 (float32
        means: the products with g, rounded to float32, in float32)."""
        mg = _bmv(self.means, g.to(self.means.dtype).unsqueeze(2)).to(torch.float64)
        b = torch.linalg.solve_triangular(self.tri, mg, upper=False).squeeze(2)
        return torch.where(self.kept, b, torch.zeros((), dtype=b.dtype, device=b.device))

    def rows64(self, idx: Tensor) -> "SpanFrame":
        """The frame of rows ``idx`` with float64 means."""
        return SpanFrame(self.coords.index_select(0, idx), self.kept.index_select(0, idx),
                         self.tri.index_select(0, idx), self.means.index_select(0, idx).to(torch.float64))


def _bmm_np(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm`` of CPU tensors through numpy's matmul."""
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def exact_bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``torch.bmm(a, b)`` at the inputs' precision. On CUDA a float32 ``bmm`` runs in TF32 (a 10-bit
    mantissa) once a script allows it (``torch.set_float32_matmul_precision("high")``, common in
    training code; a process-wide setting m2m does not touch): there the products are formed
    elementwise and summed instead, which TF32 never applies to."""
    if a.device.type != "cpu" and torch.float32 in (a.dtype, b.dtype) and _tf32_possible():
        r = (a.unsqueeze(3) * b.unsqueeze(1)).sum(2)
        return r if out is None else out.copy_(r)
    return torch.bmm(a, b) if out is None else torch.bmm(a, b, out=out)


def _tf32_possible() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def _bmv(a: Tensor, b: Tensor) -> Tensor:
    """Batched products where one side is a vector per row ([B, K, d] x [B, d, 1] or [B, 1, K] x
    [B, K, d]): on the CPU numpy's matmul, which torch's ``bmm`` of such shapes trails several-fold
    in float64 and float32 alike (docs/tuning.md, "Figures behind source comments")."""
    if a.device.type == "cpu" and a.dtype == b.dtype and a.dtype in (torch.float64, torch.float32):
        return _bmm_np(a, b)
    return exact_bmm(a, b)


def span_factor(mu: Tensor, tol: float = SPAN_TOL) -> SpanFactor:
    """``SpanFactor`` of ``span_frame(mu)``: the part that needs the Gram matrix (K^2 d per row, in
    float64), which a caller can keep for means it meets again."""
    m = mu.to(torch.float64)
    if m.device.type == "cpu":
        gram = _bmm_np(m, m.transpose(1, 2))
        # K small steps on [B, K] arrays: numpy's per-operation cost is a fraction of torch's
        c, k = _cholesky_dropping(np, gram.numpy(), tol)
        coords, kept = torch.from_numpy(c), torch.from_numpy(k)
    else:
        gram = torch.bmm(m, m.transpose(1, 2))
        coords, kept = _cholesky_dropping(torch, gram, tol)
    inv = torch.linalg.solve_triangular(_tri(coords, kept), torch.eye(coords.shape[1], dtype=torch.float64,
                                                                       device=coords.device), upper=False)
    float32_ok = inv.abs().sum(2).amax(1) <= FLOAT32_INVERSE_LIMIT
    return SpanFactor(coords, kept, float32_ok)


def _tri(coords: Tensor, kept: Tensor) -> Tensor:
    tri = coords.clone()  # 1 on the diagonal where not kept (coords has 0 there); not a [B, K, K] diag_embed + add
    tri.diagonal(dim1=1, dim2=2).add_((~kept).to(torch.float64))
    return tri


def span_frame(mu: Tensor, tol: float = SPAN_TOL, factor: SpanFactor | None = None) -> SpanFrame:
    """The frame of ``mu`` [B, K, d] (rows of any norm; zero rows are dropped).

    ``factor``: ``span_factor(mu, tol)`` computed earlier for these same means (it is not checked);
    the Gram matrix is then not formed again. Float32 means are kept as they are (see the module).
    """
    f = span_factor(mu, tol) if factor is None else factor
    if mu.dtype == torch.float32 and mu.device.type == "cpu":   # elsewhere float64, as measured nowhere else
        wide = torch.nonzero(~f.float32_ok.to(mu.device)).squeeze(1)
        return SpanFrame(f.coords, f.kept, _tri(f.coords, f.kept), mu, wide)
    return SpanFrame(f.coords, f.kept, _tri(f.coords, f.kept), mu.to(torch.float64))


def _cholesky_dropping(xp: Any, gram: Any, tol: float) -> tuple[Any, Any]:
    """Cholesky factor of each [K, K] Gram matrix in ``gram`` (numpy or torch), columns whose
    pivot (squared residual norm) is <= tol set to zero; returns (factor, kept)."""
    b, k, _ = gram.shape
    coords = xp.zeros_like(gram)
    kept = xp.zeros((b, k), dtype=bool) if xp is np else torch.zeros((b, k), dtype=torch.bool, device=gram.device)
    for j in range(k):
        row = coords[:, j, :j]
        resid = gram[:, j, j] - (row * row).sum(1)
        keep = resid > tol
        diag = xp.sqrt(xp.where(keep, resid, 1.0))
        coords[:, j, j] = xp.where(keep, diag, 0.0)
        if j + 1 < k:
            below = gram[:, j + 1:, j] - xp.matmul(coords[:, j + 1:, :j], row[:, :, None])[:, :, 0]
            coords[:, j + 1:, j] = xp.where(keep[:, None], below / diag[:, None], 0.0)
        kept[:, j] = keep
    return coords, kept
