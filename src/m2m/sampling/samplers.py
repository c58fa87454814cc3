"""Importance samplers for the stream: a `PlanSampler` per score mode, with loss feedback.

``plan(epoch)`` is `m2m.sampling.importance.importance_plan` over the mode's scores (the derivation
of its weights: docs/soc.md).
The stream computes the plan once per epoch in the consuming process; DataLoader workers inherit it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from m2m.errors import ConfigError, StateMismatchError
from m2m.sampling.importance import float32_weights, importance_plan, score_from
from m2m.sampling.priorities import LossPriorities

KAPPA_FLOOR = 0.1  # kappa below this fraction of the median is raised to it before 1/kappa


def kappa_floor(kappa: np.ndarray) -> float:
    """``KAPPA_FLOOR`` x the median positive kappa (1.0 when none): the least kappa p ∝ 1/kappa uses."""
    k = np.asarray(kappa, dtype=np.float64)
    positive = k[k > 0]
    return KAPPA_FLOOR * float(np.median(positive)) if len(positive) else 1.0


def kappa_fill(kappa: np.ndarray, dim: int) -> float:
    """The kappa given to splats without an estimate (NaN): the median finite float32 kappa, or ``dim``."""
    k = np.asarray(kappa, dtype=np.float32)
    finite = k[~np.isnan(k)]
    return float(np.median(finite)) if len(finite) else float(dim)


def kappa_scores_input(kappa: np.ndarray) -> np.ndarray:
    """kappa raised to ``KAPPA_FLOOR`` x its median (`kappa_floor`), so p ∝ 1/kappa stays finite and
    bounded.

    A splat whose neighbourhood is no tighter than chance has kappa 0 (the Bessel-corrected
    estimate); without the floor it would take all the probability.
    """
    return np.maximum(np.asarray(kappa, dtype=np.float64), kappa_floor(kappa))


class ImportanceSampler:
    """Static scores: ``"kappa"`` (p ∝ 1/kappa: diffuse regions), ``"alpha"`` or a numeric column."""

    def __init__(self, mode: str, alpha: np.ndarray, kappa: np.ndarray | None = None,
                 column: np.ndarray | None = None, seed: int = 0, floor: float = 0.1) -> None:
        self.mode = mode
        self.alpha = np.asarray(alpha, dtype=np.float64)
        self.seed = int(seed)
        self.floor = float(floor)
        if mode == "kappa" and kappa is not None:
            kappa = kappa_scores_input(kappa)
        self._scores = None if mode == "loss" else score_from(mode, kappa=kappa, alpha=self.alpha, column=column)

    def scores(self, epoch: int) -> np.ndarray:
        """The sampling scores used for ``epoch``."""
        assert self._scores is not None
        return self._scores

    def plan(self, epoch: int, num_draws: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(rows int64 [M], weights float32 [M])`` of ``epoch`` (deterministic in seed, epoch and M).

        ``num_draws`` M (default N, the lake's rows): the stream asks for exactly the draws it will
        deliver (``m2m.stream.order.delivered_draws``). Weights are ``alpha_i / (M p_i)``, so over the
        M draws ``E[sum w f] = sum_i alpha_i f_i`` exactly, whatever M (M = N: ``alpha_i / (N p_i)``).
        """
        n = len(self.alpha)
        m = n if num_draws is None else num_draws
        rows, weights = importance_plan(self.scores(epoch), self.alpha, num_draws=m, seed=self.seed,
                                        epoch=epoch, floor=self.floor)
        if m != n and m > 0:
            weights = float32_weights(weights.astype(np.float64) * (n / m), self.alpha[rows], rows)
        return rows, weights


class LossFeedback:
    """Per-row loss priorities fed back by training (`update_priorities`), frozen per epoch when that
    epoch's plan is first drawn, and saved with the stream (`state_dict`): what `LossSampler` and
    `m2m.sampling.sharded.ShardedLoss` share. Frozen copies are ``FROZEN_DTYPE``."""

    FROZEN_DTYPE: Any = np.float64
    priorities: LossPriorities
    _frozen: dict[int, np.ndarray]
    #: the rows the priorities belong to (`m2m.stream.from_lake.rows_key`; None: not known), saved with
    #: them: a state of as many rows but other ones (a consolidate then an append, a rollback then an
    #: append) was loaded position by position onto them (observed: another row drawn 181 times of 200)
    rows_key: str | None = None

    def frozen(self, epoch: int) -> np.ndarray:
        """The priorities ``epoch`` draws from (frozen the first time they are asked for)."""
        frozen = self._frozen.get(epoch)
        if frozen is None:  # the stream may look one epoch ahead: keep this one and the one frozen last
            frozen = self.priorities.tensor.numpy().astype(self.FROZEN_DTYPE)
            # by when they were frozen, as the loader's plan cache keeps plans (by when they were drawn): kept
            # by epoch number, an epoch revisited with set_epoch (1, 0, 2, 0) was served from the cached plan
            # while its priorities were gone from the state, and a resume drew another plan (observed)
            others = list(self._frozen)[-1:]
            self._frozen = {**{e: self._frozen[e] for e in others}, epoch: frozen}
        return frozen

    def update_priorities(self, ids: Any, losses: Any, source: Any = None) -> None:
        """Fold per-row losses (for lake ids) into the priorities of the next epochs (``source`` is
        for mixtures of lakes only)."""
        if source is not None:
            raise ConfigError("update_priorities: source= routes losses in a mixture of lakes (m2m.mix); "
                              "this loader streams one lake")
        self.priorities.update(ids, losses)

    def check_update(self, ids: Any, losses: Any) -> None:
        """Raise what `update_priorities` would for these ids and losses, changing nothing."""
        self.priorities.checked(ids, losses)

    def state_dict(self) -> dict[str, Any]:
        # tensors, not numpy arrays: torch.load's default weights_only=True (a Lightning checkpoint's
        # resume) refuses numpy arrays
        out: dict[str, Any] = {"priorities": torch.from_numpy(self.priorities.scores().astype(np.float32)),
                               "counts": self.priorities.counts.clone(),
                               "frozen": {int(e): torch.from_numpy(v.copy()) for e, v in self._frozen.items()}}
        if self.rows_key is not None:
            out["rows"] = self.rows_key
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; one `StateMismatchError` for a state that is not one (checked
        whole before anything changes: a string, NaN or negative priorities, frozen copies of another
        length loaded, or raised builtin errors, or failed only at the next epoch)."""
        if not isinstance(state, dict) or "priorities" not in state:
            raise StateMismatchError("a loss sampler's state is the dict dl.state_dict()['sampler'] holds, got "
                                     f"{type(state).__name__}")
        rows = len(self.priorities)
        try:
            values = np.asarray(state["priorities"], dtype=np.float32)
            counts = state.get("counts")
            frozen = {int(e): np.asarray(v, dtype=self.FROZEN_DTYPE) for e, v in (state.get("frozen") or {}).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise StateMismatchError(f"sampler state is not a loss sampler's: {exc}") from None
        if values.shape != (rows,):
            raise StateMismatchError(f"sampler state has {values.shape[0] if values.ndim == 1 else values.shape} loss "
                                     f"priorities, the lake has {rows} rows: a loss-sampling state resumes on the "
                                     "same rows only (drop state['sampler'] to restart the priorities)")
        saved_rows = state.get("rows")
        if saved_rows is not None and self.rows_key is not None and saved_rows != self.rows_key:
            raise StateMismatchError("sampler state's loss priorities belong to other rows than this snapshot's "
                                     "(consolidated, compacted, rolled back or appended to since): a loss-sampling "
                                     "state resumes on the same rows only (drop state['sampler'] to restart the "
                                     "priorities)")
        for what, arr in [("priorities", values)] + [(f"frozen priorities of epoch {e}", v) for e, v in frozen.items()]:
            if arr.shape != (rows,):
                raise StateMismatchError(f"sampler state has {arr.shape} {what} for a lake of {rows} rows")
            if not (np.isfinite(arr).all() and (arr >= 0).all()):
                raise StateMismatchError(f"sampler state's {what} must be finite and >= 0")
        # states saved before the bias correction have no counts: continue them as plain EMAs
        # (a large count makes the gain 1 - ema), except rows still at the initial value
        if counts is None:
            counts = np.where(values == np.float32(1.0), 0, 2**20).astype(np.int32)
        try:
            counts = np.asarray(counts, dtype=np.int32)
        except (TypeError, ValueError) as exc:
            raise StateMismatchError(f"sampler state's counts are not integers: {exc}") from None
        if counts.shape != values.shape:
            raise StateMismatchError(f"sampler state has {counts.shape} counts for {values.shape} priorities")
        self.priorities.tensor.copy_(torch.from_numpy(values))
        self.priorities.counts.copy_(torch.from_numpy(counts))
        self._frozen = frozen


class LossSampler(LossFeedback, ImportanceSampler):
    """Scores are per-row training losses fed back with `update_priorities` (a bias-corrected EMA per
    row, `m2m.sampling.priorities.LossPriorities`: a row's first loss replaces the initial 1.0).

    Each epoch's plan uses the priorities as they were when that epoch's plan was first drawn; they
    are frozen in `state_dict` so a resumed run redraws exactly the same plan.
    """

    def __init__(self, alpha: np.ndarray, ids: Any, seed: int = 0, floor: float = 0.1,
                 ema: float = 0.9) -> None:
        super().__init__("loss", alpha, seed=seed, floor=floor)
        self.priorities = LossPriorities(len(self.alpha), ema=ema, initial=1.0, ids=ids)
        self._frozen = {}

    def scores(self, epoch: int) -> np.ndarray:
        return self.frozen(epoch)
