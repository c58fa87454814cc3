"""The draw plan of a mixture of lakes: per-lake counts and the epoch's (source, row) list.

Pure functions of (weights, sizes, seed, epoch), so every rank and worker computes the same plan
and a resumed run sees the same epoch. Not yet wired into the pipeline (see docs/stream.md).
"""

from __future__ import annotations

import math

import numpy as np

from m2m.errors import ConfigError


def check_weights(names: list[str], weights: dict[str, float]) -> np.ndarray:
    """The weights in `names` order; one-line ConfigError on unknown/missing names or bad values."""
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConfigError(f"mix: weights name unknown lake(s) {unknown}; lakes are {names}")
    missing = [n for n in names if n not in weights]
    if missing:
        raise ConfigError(f"mix: no weight for lake(s) {missing}")
    w = np.array([float(weights[n]) for n in names], dtype=np.float64)
    bad = [n for n, x in zip(names, w) if not math.isfinite(x) or x < 0]
    if bad:
        raise ConfigError(f"mix: weights must be finite and >= 0; bad for {bad}")
    if w.sum() <= 0:
        raise ConfigError("mix: the weights sum to zero")
    return w


def counts(w: np.ndarray, epoch_rows: int) -> np.ndarray:
    """Largest-remainder rounding of w/sum(w) * epoch_rows: counts that sum exactly to epoch_rows."""
    exact = w / w.sum() * epoch_rows
    out = np.floor(exact).astype(np.int64)
    short = epoch_rows - int(out.sum())
    # ties broken by lake order so the plan is deterministic
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:short]] += 1
    return out


def epoch_draws(sizes: list[int], per_lake: np.ndarray, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, row within that lake) of every draw of `epoch`, shuffled together.

    A lake with at least its count of rows is down-sampled without replacement (a fresh subset each
    epoch); a smaller one contributes whole passes plus a without-replacement remainder.
    """
    rng = np.random.default_rng([seed, epoch, 0x6D6978])
    src, rows = [], []
    for j, (n, k) in enumerate(zip(sizes, per_lake)):
        k = int(k)
        if k and n == 0:
            raise ConfigError(f"mix: lake #{j} is empty but has a positive weight")
        passes, rest = divmod(k, n) if n else (0, 0)
        parts = [rng.permutation(n) for _ in range(passes)] + [rng.permutation(n)[:rest]]
        rows.append(np.concatenate(parts).astype(np.int64))
        src.append(np.full(k, j, dtype=np.int64))
    s, r = np.concatenate(src), np.concatenate(rows)
    perm = rng.permutation(len(s))
    return s[perm], r[perm]
