"""The augmentation hook: replaces each batch's embeddings on the batch's device."""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]
"""``gather(positions: LongTensor[n]) -> float32 [n, d]`` rows of ``mu`` on the batch's device."""


@runtime_checkable
class Augment(Protocol):
    """Called once per batch in the consuming process, after the batch reached its device.

    ``x``: float32 ``[B, d]`` embeddings; ``rows``: int64 ``[B]`` their global row positions;
    ``gather``: reads any rows of ``mu`` (e.g. neighbours) from the fastest tier; ``generator``:
    seeded from (seed, epoch, rank, batch index), so a resumed run draws the same samples.
    Returns the new float32 ``[B, d]`` embeddings (labels and ids stay those of ``rows``).
    """

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, gather: Gather,
                 generator: torch.Generator) -> torch.Tensor: ...
