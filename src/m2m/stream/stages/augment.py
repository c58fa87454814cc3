"""The augmentation of a batch, and the stage that applies it where the batches are gathered.

`augmented` is the one function that replaces a batch's embeddings: the consumer calls it per batch
(`m2m.stream.pipeline.deliver`), and `AugmentStage` calls it in a DataLoader worker for every batch
of an item. Either way batch ``j`` draws from ``batch_generator(seed, epoch, rank, j)``, so the
result does not depend on the process that made it (the conformance tests compare them bit for bit).

Why workers augment CPU streams: with ``num_workers > 0`` the consumer would otherwise augment every
batch in line, single-threaded, gathering neighbour means through direct file reads (it holds no
warm arena), while the workers only gathered rows (measured in docs/stream.md, "`num_workers`").
"""

from __future__ import annotations

from typing import Any

import torch

from m2m.errors import StreamError
from m2m.stream import columns as cols
from m2m.stream.hooks import Augment, Gather, batch_generator
from m2m.stream.stages.base import Stage, Work

__all__ = ["AugmentStage", "augmented"]


def augmented(augment: Augment, batch: dict[str, torch.Tensor], seed: int, epoch: int, rank: int, j: int,
              gather: Gather | None, ahead: tuple[torch.Generator, Any] | None = None) -> torch.Tensor:
    """Batch ``j``'s new embeddings (in the delivered dtype); ``ahead``: its ``(generator, draws)``
    made by `m2m.stream.stages.draw_ahead.PrepareAugment`."""
    delivered = batch[cols.EMBEDDING]
    x = delivered.to(torch.float32)  # augmentations compute in float32 (the `Augment` protocol)
    if ahead is not None:  # drawn ahead with this batch's generator (PrepareAugment)
        gen, draws = ahead
        # an augment given prepared draws is a PreparedAugment (draws_ahead)
        y = augment(x, batch[cols.ROWS], gather, gen, prepared=draws)  # type: ignore[call-arg,arg-type]
    else:
        gen = batch_generator(seed, epoch, rank, j, x.device)
        # batch_generator returns the torch.Generator the Augment protocol declares loosely
        y = augment(x, batch[cols.ROWS], gather, gen)  # type: ignore[arg-type]
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise StreamError(f"augment returned {got}, expected a tensor of shape {tuple(x.shape)}")
    return y.to(delivered.dtype)


class AugmentStage(Stage):
    """Replaces the embeddings of every batch of each item (in place) and marks the item augmented;
    draws made ahead upstream (``work.prepared``) are used and dropped."""

    def __init__(self, upstream: Stage, augment: Augment, batch_size: int, seed: int, rank: int,
                 gather: Gather | None) -> None:
        self.upstream = upstream
        self.augment = augment
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.gather = gather

    def __next__(self) -> Work:
        assert self.upstream is not None
        work = next(self.upstream)
        emb, rows = work.tensors[cols.EMBEDDING], work.tensors[cols.ROWS]
        prepared = work.prepared or {}
        for j in range(work.first, work.end):
            sl = work.batch_slice(j, self.batch_size)
            batch = {cols.EMBEDDING: emb[sl], cols.ROWS: rows[sl]}
            emb[sl] = augmented(self.augment, batch, self.seed, work.epoch, self.rank, j, self.gather,
                                prepared.get(j))
        work.prepared = None
        work.augmented = True
        return work
