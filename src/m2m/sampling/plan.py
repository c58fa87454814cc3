"""The contract between the stream and an importance sampler (built in `m2m.sampling`)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class PlanSampler(Protocol):
    """Draws which rows an epoch reads, and how much each counts.

    ``plan(epoch)`` returns ``(rows, weights)``: ``rows`` int64 ``[M]`` global row positions, an
    already-random draw (the stream keeps its order, except that a block-shuffled layout regroups
    it by block), deterministic in (the sampler's seed, ``epoch``, and its own state);
    ``weights`` float32 ``[M]`` importance weights delivered as the ``"weight"`` column.
    A sampler whose ``plan`` accepts ``num_draws`` is asked for exactly the draws the stream
    delivers (``m2m.stream.order.delivered_draws``), so none is dropped by ``drop_last`` or repeated
    as padding and its weights stay unbiased per epoch over all ranks.
    Samplers driven by training losses also implement ``update_priorities(ids, losses)``.
    """

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]: ...


def accepts_num_draws(sampler: object) -> bool:
    """Whether ``sampler.plan`` takes a ``num_draws`` keyword (plans exactly the delivered draws)."""
    import inspect

    try:
        # samplers are duck-typed: anything with plan(epoch[, num_draws])
        return "num_draws" in inspect.signature(sampler.plan).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False


def supports_priorities(sampler: object) -> bool:
    """Whether ``sampler`` accepts ``update_priorities(ids, losses)`` (a loss-based sampler)."""
    return callable(getattr(sampler, "update_priorities", None))
