"""Importance sampling plans: which rows an epoch draws and the weights that keep estimates unbiased.

A plan is a pure function of (scores, alpha, num_draws, seed, epoch): a fresh
``np.random.Generator`` is built from ``(seed, epoch)``, nothing global is touched.

Probabilities ``p_i = q_i / sum(q)`` with floored scores ``q_i = max(s_i / mean(s), floor)``; draws
by systematic resampling (``E[c_i] = M p_i``, each count the floor or ceiling of ``M p_i``); weights
``w_i = alpha_i / (N p_i)``. Why the floor bounds the weights, why systematic resampling, and why
``sum(w f) / sum(w)`` estimates the alpha-weighted mean without bias: docs/soc.md ("Importance
sampling"), the one place the derivation is written.

Which score helps training (``score_from``):
    * ``"kappa"``: ``1 / kappa``. kappa is the vMF concentration of a splat's neighbourhood --
      high kappa = a dense, redundant region; low kappa = diffuse, rare regions. p ∝ 1/kappa
      shows the model more of the rare regions it would otherwise see little of (and, since
      kappa ≈ (d-1) / (2 (1 - mean neighbour cosine)), ∝ the local spread), while the weights
      keep the objective that of the full alpha-weighted lake. It is the sampling analogue of
      density-based pruning (SemDeDup), without discarding anything.
    * ``"alpha"``: alpha itself -- draw in proportion to mass, weights then nearly constant.
    * ``"loss"``: per-row training-loss priorities (``m2m.sampling.priorities.LossPriorities``),
      prioritised replay with unbiasing weights.
    * any other name: a user column of non-negative numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from m2m._validate import check_int
from m2m.errors import ConfigError, InvalidEmbeddingError

__all__ = ["BUILTIN_MODES", "importance_plan", "plan_generator", "probabilities", "score_from"]

BUILTIN_MODES = ("kappa", "alpha", "loss")


def plan_generator(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's plan: a function of ``(seed, epoch)`` only."""
    check_int(seed, "seed", 0)
    check_int(epoch, "epoch", 0)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), 0x50C])))


def _vector(values: Any, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = "[N]" if n is None else f"[{n}]"
        raise InvalidEmbeddingError(f"{name} must have shape {want}, got {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InvalidEmbeddingError(f"{name} must be finite; row {int(np.argmax(bad))} is {arr[np.argmax(bad)]}")
    return arr


def probabilities(scores: Any, floor: float = 0.1) -> np.ndarray:
    """``float64 [N]`` draw probabilities ``max(s / mean(s), floor)`` normalised (see module doc)."""
    s = _vector(scores, "scores")
    neg = s < 0
    if neg.any():
        raise InvalidEmbeddingError(f"scores must be >= 0; row {int(np.argmax(neg))} is {s[np.argmax(neg)]}")
    if not isinstance(floor, (int, float, np.floating)) or isinstance(floor, bool) or not 0.0 < floor <= 1.0:
        raise ConfigError(f"floor must be a float in (0, 1], got {floor!r}")
    if s.size == 0:
        return s
    top = s.max()
    if top == 0:
        return np.full_like(s, 1.0 / s.size)
    # scaled by the largest first: a mean of scores near float64's max overflowed to inf, every s / mean
    # was 0 and the floor made the law uniform (observed with scores of 1e308); s / top keeps the ratios
    scaled = s / top
    q = np.maximum(scaled / scaled.mean(), floor)
    return q / q.sum()


def importance_plan(
    scores: Any,
    alpha: Any,
    num_draws: int,
    seed: int,
    epoch: int,
    floor: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows to draw this epoch and their importance weights (see module doc for the proof).

    Args:
        scores: ``[N]`` non-negative finite scores (higher = drawn more often).
        alpha: ``[N]`` positive masses: the target is the alpha-weighted mean over rows.
        num_draws: draws this epoch (``M``; usually N).
        seed, epoch: the plan is a deterministic function of these.
        floor: minimum normalised score (fraction of the mean score) every row keeps.

    Returns:
        ``(indices int64 [M], weights float32 [M])``: row positions in random order, and
        ``w = alpha / (N p)`` per draw.
    """
    p = probabilities(scores, floor)
    n = p.size
    a = _vector(alpha, "alpha", n)
    low = a <= 0
    if low.any():
        raise InvalidEmbeddingError(f"alpha must be > 0; row {int(np.argmax(low))} is {a[np.argmax(low)]}")
    check_int(num_draws, "num_draws", 0)
    gen = plan_generator(seed, epoch)
    if n == 0 or num_draws == 0:
        if n == 0 and num_draws > 0:
            raise ConfigError(f"cannot draw {num_draws} rows from an empty set")
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    m = int(num_draws)
    order = gen.permutation(n)
    cum = np.cumsum(p[order])
    cum[-1] = 1.0
    u = gen.random()
    edges = np.ceil(m * cum - u).astype(np.int64)
    counts = np.diff(edges, prepend=0)  # ceil(-u) = 0 for u in [0, 1)
    indices = np.repeat(order, counts)
    indices = indices[gen.permutation(indices.size)]
    weights = float32_weights(a[indices] / (n * p[indices]), a[indices], indices)
    return indices.astype(np.int64), weights


def float32_weights(weights: np.ndarray, alpha: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``alpha_i / (M p_i)`` weights (float64) as the float32 a batch carries; `InvalidEmbeddingError`
    naming the row and its alpha when one is beyond float32 (observed: an alpha of 3e38, which
    `add_splats` accepts, gave an inf weight, refused later as "plan weight inf at position 16")."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size and not weights.max() <= np.finfo(np.float32).max:
        at = int(np.argmax(weights))
        raise InvalidEmbeddingError(
            f"the importance weight alpha / (draws * p) of row {int(rows[at])} is {weights[at]:.3g} (its alpha is "
            f"{float(alpha[at]):.3g}), beyond float32 (3.4e38): rescale alpha (a weighted mean depends only on its "
            "ratios)")
    return weights.astype(np.float32)


def score_from(
    mode: str,
    kappa: Any = None,
    alpha: Any = None,
    column: Any = None,
    priorities: Any = None,
) -> np.ndarray:
    """``float64 [N]`` sampling scores of a mode: "kappa" (1/kappa), "alpha", "loss" (priorities) or a column.

    Any mode name other than the built-ins reads ``column`` (a user metadata column).
    """
    if mode == "kappa":
        if kappa is None:
            raise ConfigError("importance mode 'kappa' needs kappa (estimate it first)")
        k = _vector(kappa, "kappa")
        low = k <= 0
        if low.any():
            raise InvalidEmbeddingError(f"kappa must be > 0; row {int(np.argmax(low))} is {k[np.argmax(low)]}")
        return 1.0 / k
    if mode == "alpha":
        if alpha is None:
            raise ConfigError("importance mode 'alpha' needs alpha")
        return _vector(alpha, "alpha")
    if mode == "loss":
        if priorities is None:
            raise ConfigError("importance mode 'loss' needs priorities")
        return _vector(priorities, "priorities")
    if not isinstance(mode, str) or not mode:
        raise ConfigError(f"importance mode must be 'kappa', 'alpha', 'loss' or a column name, got {mode!r}")
    if column is None:
        raise ConfigError(f"importance mode {mode!r} needs the values of column {mode!r}")
    values = _vector(column, f"column {mode!r}")
    neg = values < 0
    if neg.any():  # (refused at the first epoch's plan before, without the column's name)
        raise InvalidEmbeddingError(f"importance column {mode!r} must be >= 0 (scores); row {int(np.argmax(neg))} "
                                    f"is {values[np.argmax(neg)]}")
    return values
