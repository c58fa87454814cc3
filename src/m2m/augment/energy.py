"""The energy of a row's splats and the Langevin step length.

Each row owns K mixture components (mu_j, kappa_j, alpha_j). The target on the unit sphere is

    p(x) ∝ ( sum_j alpha_j C_d(kappa_j) exp(kappa_j mu_j.x) )^(1/T),   E(x) = -log p(x),

so log p(x) = (1/T) logsumexp_j(a_j + kappa_j mu_j.x) with a_j = log alpha_j + log C_d(kappa_j);
each normalised component carries mass alpha_j, so at T = 1 the mixture weights are alpha_j / sum alpha.

Step length. The Langevin step is h = step_size / kappa_ref with
kappa_ref = max(max_j kappa_j / T, d - 1) over the row's present components in ``langevin.sample`` (unless
``step_kappa`` is given); ``LangevinAugmenter`` uses the row's own kappa, kappa_ref = max(kappa_i / T, d - 1). A vMF(kappa) is locally a
Gaussian of variance 1/kappa per tangent direction, so ``step_size`` is dimensionless: one step
relaxes a fraction ~step_size of the distance to the stationary spread of the most concentrated
component (the discretisation stays stable for step_size <= 1), and the floor d - 1 caps one step's
geodesic length at about sqrt(2 step_size) radians for diffuse components (kappa = 0 included).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from m2m.errors import ConfigError
from m2m.geometry.span import exact_bmm
from m2m.geometry.vmf import log_normalizer

__all__ = [
    "DEFAULT_STEP_SIZE",
    "component_log_weights",
    "kappa_ref",
    "log_density_and_gradient",
    "step_length",
    "validate_chain_args",
]

DEFAULT_STEP_SIZE = 0.06
"""Default ``step_size`` (M2MConfig.langevin_dt): with 5 steps from a splat's mean, a sample keeps a mean
cosine of ~0.95 to its source when the splat's own vMF has mean cosine 0.9 (kappa ~ 1.8k at d = 384,
~3k at d = 640); the strength does not depend on d or kappa (see ``m2m.augment.langevin``)."""


def component_log_weights(kappa: Tensor, alpha: Tensor, dim: int, mask: Tensor | None = None) -> Tensor:
    """a_j = log alpha_j + log C_d(kappa_j) (float64), -inf where ``mask`` is False."""
    a = torch.log(alpha.to(torch.float64)) + log_normalizer(kappa.to(torch.float64), dim)
    if mask is not None:
        a = torch.where(mask, a, torch.full_like(a, -math.inf))
    return a


def kappa_ref(kappa: Tensor, mask: Tensor | None, dim: int, temperature: float) -> Tensor:
    """max(max_j kappa_j / T over present components, d - 1): [..., K] -> [...] (float64)."""
    k = kappa.to(torch.float64)
    if mask is not None:
        k = torch.where(mask, k, torch.zeros_like(k))
    return torch.clamp(k.amax(-1) / temperature, min=float(dim - 1))


def step_length(step_size: float, kappa: Tensor, mask: Tensor | None, dim: int, temperature: float) -> Tensor:
    """The Langevin step h = step_size / kappa_ref for each row (float64)."""
    return step_size / kappa_ref(kappa, mask, dim, temperature)


def log_density_and_gradient(x: Tensor, mu: Tensor, kappa: Tensor, log_w: Tensor, temperature: float,
                             grad_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(log p(x) up to a constant [B], Euclidean gradient of log p [B, d]) for x [B, d], mu [B, K, d].

    ``kappa`` and ``log_w`` are [B, K] in x's dtype (``log_w`` -inf for absent components); the
    gradient is written into ``grad_out`` [B, d] when given.
    """
    s = exact_bmm(x.unsqueeze(1), mu.transpose(1, 2)).squeeze(1)         # mu_j . x, [B, K]
    logits = torch.addcmul(log_w, kappa, s)
    lse = torch.logsumexp(logits, dim=-1)
    w = torch.exp(logits - lse.unsqueeze(-1))
    coef = (w * kappa).unsqueeze(1) / temperature
    if grad_out is None:
        grad = exact_bmm(coef, mu).squeeze(1)
    else:
        grad = exact_bmm(coef, mu, out=grad_out.unsqueeze(1)).squeeze(1)
    return lse / temperature, grad


def validate_chain_args(steps: int, step_size: float, temperature: float) -> None:
    """Raise ConfigError naming the bad value of a Langevin chain's scalar settings."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(step_size, (int, float)) or isinstance(step_size, bool) or not (0.0 < step_size <= 1.0):
        raise ConfigError(f"step_size must be in (0, 1], got {step_size!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
            0.0 < temperature < math.inf):
        raise ConfigError(f"temperature must be a finite float > 0, got {temperature!r}")
