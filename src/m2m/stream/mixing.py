"""The draw plan of a mixture of lakes: per-lake counts and the epoch's (source, row) list.

Pure functions of (weights, sizes, seed, epoch), so every rank and worker computes the same plan
and a resumed run sees the same epoch. `MixtureSampler` is the plan sampler (`m2m.sampling.plan.PlanSampler`)
of a mixture stream (`m2m.stream.mixture`): its plan holds global rows of the concatenated lakes, which
the one pipeline orders, shards over ranks and workers and resumes like any importance plan.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import torch

from m2m._validate import as_numpy, integer_problem
from m2m.errors import ConfigError, InvalidEmbeddingError, M2MError, StateMismatchError
from m2m.sampling.priorities import as_losses


def check_weights(names: list[str], weights: dict[str, float]) -> np.ndarray:
    """The weights in `names` order, relative to the largest; one-line ConfigError on unknown/missing
    names or bad values."""
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConfigError(f"mix: weights name unknown lake(s) {unknown}; lakes are {names}")
    missing = [n for n in names if n not in weights]
    if missing:
        raise ConfigError(f"mix: no weight for lake(s) {missing}")
    values = []
    for n in names:
        value = weights[n]
        is_bool = isinstance(value, (bool, np.bool_)) or (torch.is_tensor(value) and value.dtype == torch.bool)
        is_text = isinstance(value, (str, bytes))  # float("1") would take the string as a number
        try:
            number = None if is_bool or is_text else float(value)
        except (TypeError, ValueError, RuntimeError):  # (a string, None, a tensor of 2: builtin errors before)
            number = None
        if number is None:
            raise ConfigError(f"mix: the weight of lake {n!r} must be a number, got {value!r}")
        values.append(number)
    w = np.array(values, dtype=np.float64)
    bad = [n for n, x in zip(names, w) if not math.isfinite(x) or x < 0]
    if bad:
        raise ConfigError(f"mix: weights must be finite and >= 0; bad for {bad}")
    if w.max() <= 0:
        raise ConfigError("mix: the weights sum to zero")
    w = w / w.max()  # (weights of 1e308 summed to inf: every normalised weight 0, 2 rows an epoch)
    tiny = [(n, x) for n, x in zip(names, w / w.sum()) if 0 < x < 0.5 / SHARE_DENOMINATOR]
    if tiny:  # (its share was read as 0: the lake silently got no rows, at any epoch_rows)
        n, x = tiny[0]
        raise ConfigError(f"mix: the weight of lake {n!r} is {x:.3g} of the total; shares below "
                          f"{0.5 / SHARE_DENOMINATOR:g} round to 0 (give weight 0 to leave a lake out)")
    return w


#: Largest denominator of the fraction a share is read as (`shares`)
SHARE_DENOMINATOR = 10**9


def shares(w: np.ndarray) -> np.ndarray:
    """`check_weights`'s weights as shares, each the closest fraction with a denominator up to
    `SHARE_DENOMINATOR`, so that one proportion written two ways (0.4 : 0.6 and 2 : 3, 5 : 12 and
    5/17 : 12/17, whose quotients differ in the last bits) is one set of shares: a mixture's counts,
    plan and state name follow from these values alone. (Rounding to 15 significant digits left ~2% of
    such pairs apart, where the share lay near a rounding boundary.) A share moves by less than
    1 / SHARE_DENOMINATOR = 1e-9 (it is the closest such fraction): 1 : 1 and 1 : 1.0000008 are two
    mixtures, 1 : 1 and 1 : 1 + 4e-10 one, and a share below 5e-10 (1 : 4e-10) is 0, so that lake gets
    no rows: `check_weights` refuses such a weight."""
    return np.array([float(Fraction(float(x)).limit_denominator(SHARE_DENOMINATOR)) for x in w / w.sum()],
                    dtype=np.float64)


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
    src, rows, _ = epoch_plan(sizes, per_lake, seed, epoch)
    return src, rows


def epoch_plan(sizes: Sequence[int], per_lake: np.ndarray, seed: int, epoch: int,
               drawn: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source index, row within that lake, weight) of every draw of `epoch`, shuffled together.

    ``drawn[j]``: lake ``j``'s own importance plan of exactly ``per_lake[j]`` draws (rows, weights),
    used as is; a lake without one is drawn uniformly as `epoch_draws` says, with weight 1.
    """
    rng = np.random.default_rng([seed, epoch, 0x6D6978])
    src, rows, weights = [], [], []
    for j, (n, k) in enumerate(zip(sizes, per_lake)):
        k = int(k)
        if k and n == 0:
            raise ConfigError(f"mix: lake #{j} is empty but has a positive weight")
        own = None if drawn is None else drawn[j]
        if own is not None:
            r, w = own
            if len(r) != k:
                raise ConfigError(f"mix: lake #{j}'s sampler planned {len(r)} draws, the mixture asked {k}")
            rows.append(np.asarray(r, dtype=np.int64))
            weights.append(np.asarray(w, dtype=np.float32))
        else:
            passes, rest = divmod(k, n) if n else (0, 0)
            parts = [rng.permutation(n) for _ in range(passes)] + [rng.permutation(n)[:rest]]
            rows.append(np.concatenate(parts).astype(np.int64))
            weights.append(np.ones(k, dtype=np.float32))
        src.append(np.full(k, j, dtype=np.int64))
    s, r, w = np.concatenate(src), np.concatenate(rows), np.concatenate(weights)
    perm = rng.permutation(len(s))
    return s[perm], r[perm], w[perm]


def lake_seed(seed: int, j: int) -> int:
    """The seed of lake ``j``'s own sampler in a mixture (independent draws per lake)."""
    return int(np.random.SeedSequence([int(seed), j, 0x6D6978]).generate_state(1)[0])


class MixtureSampler:
    """The plan sampler of a mixture: per epoch, ``counts`` draws from each lake (its own importance
    sampler's plan when it has one, else uniform), as global rows of the concatenated lakes
    (``bases[j]`` + row within lake ``j``), shuffled together. A pure function of (seed, epoch)."""

    def __init__(self, sizes: Sequence[int], weights: np.ndarray, epoch_rows: int, seed: int,
                 samplers: Sequence[Any | None], mean_alpha: Sequence[float] | None = None,
                 names: Sequence[str] | None = None) -> None:
        """``mean_alpha``: each lake's mean alpha (None: 1 each), by which its importance weights are
        divided so that they average 1; ``names``: the lakes' names, for messages."""
        self.sizes = [int(n) for n in sizes]
        self.names = None if names is None else [str(n) for n in names]
        given = [1.0] * len(self.sizes) if mean_alpha is None else [float(a) for a in mean_alpha]
        self.mean_alpha = [a if a > 0 and np.isfinite(a) else 1.0 for a in given]
        self.bases = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.counts = counts(weights, int(epoch_rows))
        self.seed = int(seed)
        self.samplers = list(samplers)
        for j, (n, k) in enumerate(zip(self.sizes, self.counts)):
            if k and n == 0:
                raise ConfigError(f"mix: {self.lake(j)} is empty but has a positive weight")

    def lake(self, j: int) -> str:
        """Lake ``j`` in a message: its name where known, and its ``source`` index."""
        return f"lake #{j} (source {j})" if self.names is None else f"lake {self.names[j]!r} (source {j})"

    def plan_length(self) -> int:
        """Draws in every epoch's plan (``sum(counts)``): an epoch's batch count without drawing its plan."""
        return int(self.counts.sum())

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Global rows and importance weights of ``epoch`` (``sum(counts)`` draws)."""
        from m2m.stream.order import check_plan

        drawn: list[tuple[np.ndarray, np.ndarray] | None] = []
        for j, sampler in enumerate(self.samplers):
            if sampler is None:
                drawn.append(None)
                continue
            try:
                rows, weights = check_plan(sampler.plan(epoch, num_draws=int(self.counts[j])), self.sizes[j])
            except (ConfigError, InvalidEmbeddingError) as exc:   # (a large lake's scores are read here)
                raise type(exc)(f"mix: {self.lake(j)}: {exc}") from exc
            # alpha / (N_j p) / mean alpha_j: a lake's weights average 1, as those of a lake without a sampler
            # do, so sum(w loss) / sum(w) keeps the mixture's proportions. Its sampler's alpha / (c_j p) made
            # each lake's total weight its total alpha whatever its share (800/200 rows at 50/50 weighed 80/20),
            # and alpha / (N_j p) its mean alpha (a consolidated lake, mean alpha 3, at 50/50 weighed 75/25;
            # both observed)
            scaled = weights.astype(np.float64) * (int(self.counts[j]) / self.sizes[j] / self.mean_alpha[j])
            if not np.isfinite(scaled.astype(np.float32)).all():
                raise ConfigError(f"mix: {self.lake(j)}: importance weights overflow float32 at its share of the mixture")
            drawn.append((rows, scaled.astype(np.float32)))
        src, rows, weights = epoch_plan(self.sizes, self.counts, self.seed, epoch, drawn)
        return self.bases[src] + rows, weights


class LossMixtureSampler(MixtureSampler):
    """A `MixtureSampler` whose lakes each draw from their own loss sampler
    (``importance_sampling="loss"``). Lakes may share ids, so losses are routed by the batch's
    ``source`` column: ``update_priorities(batch["id"], loss, source=batch["source"])``."""

    def update_priorities(self, ids: Any, losses: Any, source: Any = None) -> None:
        """Fold per-row losses into the priorities of each row's own lake (``source[i]`` is the
        index of row ``i``'s lake, as the mixture's ``source`` column gives it)."""
        if source is None:
            raise ConfigError("update_priorities on a mixture needs source= (the batch's 'source' column): "
                              "lakes may share ids")
        src_np = as_numpy(source, "source")
        problem = integer_problem(src_np)
        if problem is not None:
            raise ConfigError("update_priorities: source= takes the batch's 'source' column (each row's lake "
                              f"index, 0..{len(self.samplers) - 1}), got {problem}")
        src = torch.from_numpy(np.ascontiguousarray(src_np, dtype=np.int64)).reshape(-1)
        ids_np = as_numpy(ids, "ids")
        problem = integer_problem(ids_np)
        if problem is not None:
            raise ConfigError(f"update_priorities: ids must be the batch's 'id' column, got {problem}")
        ids_t = torch.from_numpy(np.ascontiguousarray(ids_np, dtype=np.int64)).reshape(-1)
        loss_t = as_losses(losses)
        if not (len(src) == len(ids_t) == len(loss_t)):
            raise ConfigError(f"update_priorities: {len(ids_t)} ids, {len(loss_t)} losses and {len(src)} sources "
                              "must match")
        bad = (src < 0) | (src >= len(self.samplers))
        if bool(bad.any()):
            raise ConfigError(f"update_priorities: source {int(src[bad][0])} names no lake of this mixture "
                              f"(0..{len(self.samplers) - 1})")
        # every lake's part checked before any is applied: a failing lake left the others updated, and a
        # retry after the error applied them twice
        parts = [(j, sampler, ids_t[src == j], loss_t[src == j]) for j, sampler in enumerate(self.samplers)
                 if sampler is not None and bool((src == j).any())]
        for j, sampler, lake_ids, lake_losses in parts:
            try:
                sampler.check_update(lake_ids, lake_losses)
            except M2MError as exc:  # (the error named an id, not the lake it was routed to)
                raise type(exc)(f"update_priorities: {self.lake(j)}: {exc}") from exc
        for _, sampler, lake_ids, lake_losses in parts:
            sampler.update_priorities(lake_ids, lake_losses)

    def state_dict(self) -> dict[str, Any]:
        """Each lake's sampler state (its priorities), in lake order."""
        return {"lakes": [None if s is None else s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lakes = state.get("lakes") if isinstance(state, dict) else None
        if not isinstance(lakes, list) or len(lakes) != len(self.samplers):
            raise StateMismatchError(f"sampler state is not that of a {len(self.samplers)}-lake mixture")
        # all lakes or none: a state refused for one lake left the lakes before it loaded
        before = [None if s is None else s.state_dict() for s in self.samplers]
        for j, (sampler, saved) in enumerate(zip(self.samplers, lakes)):
            if sampler is None or saved is None:
                continue
            try:
                sampler.load_state_dict(saved)
            except M2MError as exc:
                for earlier, kept in zip(self.samplers[:j], before):
                    if earlier is not None and kept is not None:
                        earlier.load_state_dict(kept)
                raise type(exc)(f"mix: {self.lake(j)}: {exc}") from None
