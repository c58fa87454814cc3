"""The lifecycle every stage shares, and the unit of work that flows through them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from m2m.stream.columns import Column


@dataclass
class Work:
    """A run of consecutive batches ``[first, end)`` of one rank's epoch, as it moves down the stream.

    ``rows``/``weights`` are the batches' global rows and importance weights; stages fill
    ``tensors`` (one entry per delivered column, rows concatenated), add counter deltas to
    ``stats``.
    ``prepared`` maps a batch index to ``(generator, draws)`` of its augmentation made ahead;
    ``augmented``: the embeddings are already augmented (by a DataLoader worker, `AugmentStage`).
    """

    epoch: int
    first: int
    end: int
    rows: np.ndarray
    weights: np.ndarray | None
    ahead: np.ndarray | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    ready: Any = None
    prepared: dict[int, Any] | None = None
    augmented: bool = False

    def batch_slice(self, j: int, batch_size: int) -> slice:
        """Rows of batch ``j`` (``first <= j < end``) within this item's concatenated rows."""
        lo = (j - self.first) * batch_size
        return slice(lo, min(lo + batch_size, len(self.rows)))

    def count(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + value


class Stage:
    """Iteration and ``shutdown()``. Stages keep no resume state: each pass builds its chain anew
    (`m2m.stream.pipeline`), the source stage starting at the pass's first batch (`m2m.stream.state`)."""

    upstream: "Stage | None" = None

    def __iter__(self) -> Iterator[Work]:
        return self

    def __next__(self) -> Work:
        raise NotImplementedError

    def shutdown(self) -> None:
        if self.upstream is not None:
            self.upstream.shutdown()


class BufferSource(Protocol):
    """Where host gathers write one item's columns (see `m2m.stream.stages.hot.HostBuffers`)."""

    def begin(self) -> None: ...

    def get(self, col: "Column", rows: int, converting: bool = False) -> torch.Tensor: ...
