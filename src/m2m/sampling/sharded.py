"""Importance plans drawn shard by shard, so a rank materialises only its own share of the draws.

`m2m.sampling.importance.importance_plan` draws the whole epoch at once: at 1B rows that is 12 GB
(int64 rows + float32 weights) and a whole-lake permutation on every rank. `ShardedImportance`
draws the same distribution in two stages, each a systematic resampling as in
`importance_plan`:

1. how many draws each shard gets, ``C_s``, with ``E[C_s] = M Q_s / Q`` where ``Q_s`` is the shard's
   sum of floored scores ``q_i`` and ``Q`` their total (O(shards) memory, one generator per epoch);
2. which rows of shard ``s`` its ``C_s`` draws hit, with probabilities ``q_i / Q_s`` (a generator per
   (seed, epoch, shard), so a shard's draws are computed alone, from that shard's scores only).

So ``E[c_i] = E[C_s] q_i / Q_s = M p_i`` with ``p_i = q_i / Q`` exactly as for the one-stage plan,
and the weights are the same ``alpha_i / (M p_i)`` (``alpha_i / (N p_i)`` when M = N): the
alpha-weighted estimates stay unbiased (docs/soc.md, "Importance sampling"). The draws differ from
`importance_plan`'s (another random scheme with the same expectations).

The floor ``max(s / mean(s), floor)`` needs the mean score of the whole lake: the shard masses
``Q_s`` take two passes over the scores, one shard in memory at a time, once per sampler (static
scores), not per epoch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from m2m._validate import check_int
from m2m.errors import ConfigError, InvalidEmbeddingError
from m2m.sampling.importance import float32_weights
from m2m.sampling.priorities import LossPriorities
from m2m.sampling.samplers import LossFeedback

__all__ = ["ShardedImportance", "ShardedLoss", "ShardedPlanSampler", "floored_sum", "shard_masses"]

_SALT_COUNTS = 0x5C0
_SALT_DRAWS = 0x5C1

Values = Callable[[int], np.ndarray]


@runtime_checkable
class ShardedPlanSampler(Protocol):
    """A plan sampler whose epoch is drawn per shard (`m2m.stream.affinity.rank_epoch_sharded`)."""

    def shard_counts(self, epoch: int, num_draws: int) -> np.ndarray: ...

    def shard_draws(self, epoch: int, shard: int, count: int, num_draws: int) -> tuple[np.ndarray, np.ndarray]: ...


def _systematic(mass: np.ndarray, m: int, gen: np.random.Generator) -> np.ndarray:
    """Counts per item (in ``mass``'s order) of ``m`` systematic draws with probabilities ∝ ``mass``,
    visiting the items in a random order: each count is the floor or ceiling of its expectation."""
    order = gen.permutation(len(mass))
    cum = np.cumsum(mass[order])
    cum /= cum[-1]
    cum[-1] = 1.0
    edges = np.ceil(m * cum - gen.random()).astype(np.int64)
    counts = np.empty(len(mass), dtype=np.int64)
    counts[order] = np.diff(edges, prepend=0)
    return counts


class ShardedImportance:
    """An importance sampler over a lake cut into shards (``shard_offsets``), reading the scores and
    alpha of one shard at a time (``scores_of(shard)``, ``alpha_of(shard)``: float arrays of that
    shard's rows). Also a whole-epoch `m2m.sampling.plan.PlanSampler` (`plan`) for streams without
    shard affinity. ``masses``: the `masses` of the same scores computed before (they cost two passes
    over every shard's scores; a rank may load them instead)."""

    def __init__(self, shard_offsets: np.ndarray, scores_of: Values, alpha_of: Values, seed: int = 0,
                 floor: float = 0.1, masses: tuple[np.ndarray, float] | None = None) -> None:
        self.offsets = np.asarray(shard_offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or np.any(np.diff(self.offsets) < 0):
            raise ConfigError(f"shard_offsets must be non-decreasing [S + 1], got shape {self.offsets.shape}")
        if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not 0.0 < floor <= 1.0:
            raise ConfigError(f"floor must be a float in (0, 1], got {floor!r}")
        self.scores_of, self.alpha_of = scores_of, alpha_of
        self.seed = check_int(seed, "seed", 0)
        self.floor = float(floor)
        self._masses: tuple[np.ndarray, float] | None = None
        if masses is not None:  # computed once elsewhere (`masses()` of another process): no pass here
            q = np.asarray(masses[0], dtype=np.float64)
            if q.shape != (len(self.offsets) - 1,) or not np.all(np.isfinite(q)) or np.any(q < 0):
                raise ConfigError(f"masses must be finite, >= 0 and of shape [{len(self.offsets) - 1}], got {q.shape}")
            self._masses = (q, float(masses[1]))

    @classmethod
    def from_arrays(cls, shard_offsets: np.ndarray, scores: np.ndarray, alpha: np.ndarray, seed: int = 0,
                    floor: float = 0.1) -> "ShardedImportance":
        """Over whole in-memory ``scores`` and ``alpha`` arrays (tests, small lakes)."""
        offsets = np.asarray(shard_offsets, dtype=np.int64)
        s, a = np.asarray(scores, dtype=np.float64), np.asarray(alpha, dtype=np.float64)
        return cls(offsets, lambda i: s[offsets[i]:offsets[i + 1]], lambda i: a[offsets[i]:offsets[i + 1]], seed,
                   floor)

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def _scores(self, shard: int) -> np.ndarray:
        s = np.asarray(self.scores_of(shard), dtype=np.float64)
        rows = int(self.offsets[shard + 1] - self.offsets[shard])
        if s.shape != (rows,):
            raise InvalidEmbeddingError(f"scores of shard {shard} must have shape [{rows}], got {s.shape}")
        bad = ~np.isfinite(s) | (s < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidEmbeddingError(f"scores must be finite and >= 0; row {int(self.offsets[shard]) + i} "
                                        f"is {s[i]}")
        return s

    def masses(self) -> tuple[np.ndarray, float]:
        """``(Q_s float64 [S], mean score)``: each shard's sum of floored scores (two passes, cached)."""
        if self._masses is None:
            shards = len(self.offsets) - 1
            with np.errstate(over="ignore"):
                total = sum(float(self._scores(i).sum()) for i in range(shards))
            mean = total / max(1, self.num_rows)
            if not math.isfinite(total):  # scores near float64's max: their sum overflows, the scaled mean not
                top = max(float(self._scores(i).max(initial=0.0)) for i in range(shards))
                mean = top * (sum(float((self._scores(i) / top).sum()) for i in range(shards)) / max(1, self.num_rows))
            q = np.array([floored_sum(self._scores(i), mean, self.floor) for i in range(shards)], dtype=np.float64)
            self._masses = (q, mean)
        return self._masses

    def epoch_masses(self, epoch: int) -> tuple[np.ndarray, float]:
        """`masses` of the scores ``epoch`` draws from (static scores: the same every epoch)."""
        return self.masses()

    def epoch_scores(self, epoch: int, shard: int) -> np.ndarray:
        """Shard ``shard``'s scores in ``epoch`` (static scores: the same every epoch)."""
        return self._scores(shard)

    def _floored(self, s: np.ndarray, mean: float) -> np.ndarray:
        return np.ones_like(s) if mean == 0 else np.maximum(s / mean, self.floor)

    def shard_counts(self, epoch: int, num_draws: int) -> np.ndarray:
        """int64 [S]: draws per shard in ``epoch`` (sum ``num_draws``), a function of (seed, epoch, M)."""
        check_int(epoch, "epoch", 0)
        m = check_int(num_draws, "num_draws", 0)
        q, _ = self.epoch_masses(epoch)
        if m == 0 or len(q) == 0:
            return np.zeros(len(q), dtype=np.int64)
        if q.sum() <= 0:
            raise ConfigError(f"cannot draw {m} rows from an empty set")
        gen = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), _SALT_COUNTS]))
        return _systematic(q, m, gen)

    def shard_draws(self, epoch: int, shard: int, count: int, num_draws: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows int64 [count] global, weights float32 [count])``: shard ``shard``'s ``count`` draws
        (its `shard_counts`) in ``epoch``, in random order; weights ``alpha_i / (M p_i)``, M =
        ``num_draws`` the epoch's draws over all shards."""
        if count == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q_all, mean = self.epoch_masses(epoch)
        s = self._floored(self.epoch_scores(epoch, shard), mean)
        gen = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), _SALT_DRAWS, int(shard)]))
        local = np.repeat(np.arange(len(s), dtype=np.int64), _systematic(s, count, gen))
        local = local[gen.permutation(count)]
        alpha = np.asarray(self.alpha_of(shard), dtype=np.float64)[local]
        if np.any(alpha <= 0):
            raise InvalidEmbeddingError(f"alpha must be > 0; row {int(self.offsets[shard] + local[alpha <= 0][0])} "
                                        f"is {alpha[alpha <= 0][0]}")
        p = s[local] / q_all.sum()
        rows = self.offsets[shard] + local
        return rows, float32_weights(alpha / (float(num_draws) * p), alpha, rows)

    def plan(self, epoch: int, num_draws: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The whole epoch (every shard's draws, in a random order): the `PlanSampler` form."""
        m = self.num_rows if num_draws is None else num_draws
        counts = self.shard_counts(epoch, m)
        parts = [self.shard_draws(epoch, i, int(c), m) for i, c in enumerate(counts.tolist()) if c]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows = np.concatenate([r for r, _ in parts])
        weights = np.concatenate([w for _, w in parts])
        perm = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), _SALT_DRAWS])).permutation(m)
        return rows[perm], weights[perm]


class ShardedLoss(LossFeedback, ShardedImportance):
    """Importance by training loss (`m2m.sampling.samplers.LossSampler`'s priorities and feedback),
    drawn shard by shard: the epoch's frozen priorities are its scores, the shard masses are summed
    from them once per epoch (in memory), and alpha is read one shard at a time (``alpha_of``), so
    with shard affinity a rank draws only its own shards' rows. The priorities stay whole-lake (every
    row's loss may be fed back), frozen as float32 (4 B a row per epoch held, two at most).
    ``ids``: as `LossPriorities` (an id array, or a callable mapping ids to positions)."""

    FROZEN_DTYPE = np.float32

    def __init__(self, shard_offsets: np.ndarray, alpha_of: Values, ids: Any = None, seed: int = 0,
                 floor: float = 0.1, ema: float = 0.9) -> None:
        super().__init__(shard_offsets, _no_static_scores, alpha_of, seed=seed, floor=floor)
        self.priorities = LossPriorities(self.num_rows, ema=ema, initial=1.0, ids=ids)
        self._frozen = {}
        self._epoch_masses: dict[int, tuple[np.ndarray, float]] = {}

    def masses(self) -> tuple[np.ndarray, float]:
        raise ConfigError("a loss sampler's masses change every epoch: use epoch_masses(epoch)")

    def epoch_scores(self, epoch: int, shard: int) -> np.ndarray:
        return self.frozen(epoch)[self.offsets[shard]:self.offsets[shard + 1]].astype(np.float64)

    def epoch_masses(self, epoch: int) -> tuple[np.ndarray, float]:
        frozen = self.frozen(epoch)
        got = self._epoch_masses.get(epoch)
        if got is None:
            got = shard_masses(frozen, self.offsets, self.floor)
            self._epoch_masses = {e: m for e, m in self._epoch_masses.items() if e in self._frozen} | {epoch: got}
        return got

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._epoch_masses = {}


def _no_static_scores(shard: int) -> np.ndarray:
    raise ConfigError("a loss sampler has no static scores")


def floored_sum(scores: np.ndarray, mean: float, floor: float) -> float:
    """Sum of ``max(s / mean, floor)`` over ``scores`` (their count when the mean is 0): one shard's
    mass, computed on one float64 copy in place."""
    if mean == 0:
        return float(len(scores))
    x = np.array(scores, dtype=np.float64)
    x /= mean
    np.maximum(x, floor, out=x)
    return float(x.sum())


def shard_masses(scores: np.ndarray, offsets: np.ndarray, floor: float) -> tuple[np.ndarray, float]:
    """``(Q_s, mean)`` of in-memory ``scores`` cut at ``offsets``: `ShardedImportance.masses` of the
    same scores, one shard at a time (`floored_sum`; 4x faster than one cumulative sum over the lake,
    `benchmarks/bench_loss_masses.py`)."""
    n = int(offsets[-1])
    mean = float(np.sum(scores, dtype=np.float64)) / max(1, n)
    q = np.array([floored_sum(scores[lo:hi], mean, floor) for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())],
                 dtype=np.float64)
    return q, mean
