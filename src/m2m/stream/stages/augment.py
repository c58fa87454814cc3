"""Draw ahead: each batch's augmentation draws, made where the stage runs (the prefetch thread).

An augmentation with ``prepare`` (``m2m.stream.hooks.PreparedAugment``) splits its work into the
draws that do not read the batch's vectors and the rest. This stage makes the draws of every batch
of an item with the batch's own generator (``batch_generator``) and attaches them to the item; the
consumer applies them with the same generator object, so the result equals the in-line path exactly
and resume is unaffected (nothing here is state: draws are a function of the batch's coordinates).
"""

from __future__ import annotations

import torch

from m2m.stream import columns as cols
from m2m.stream.hooks import Gather, PreparedAugment, batch_generator
from m2m.stream.stages.base import Stage, Work


class PrepareAugment(Stage):
    """Attaches ``{batch: (generator, augment.prepare(...))}`` to each item as ``work.prepared``."""

    def __init__(self, upstream: Stage, augment: PreparedAugment, batch_size: int, seed: int, rank: int,
                 dim: int, gather: Gather | None) -> None:
        self.upstream = upstream
        self.augment = augment
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.dim = dim
        self.gather = gather

    def __next__(self) -> Work:
        assert self.upstream is not None
        work = next(self.upstream)
        rows = work.tensors[cols.ROWS]
        prepared = {}
        for j in range(work.first, work.end):
            lo = (j - work.first) * self.batch_size
            batch_rows = rows[lo:lo + self.batch_size]
            gen = batch_generator(self.seed, work.epoch, self.rank, j, batch_rows.device)
            prepared[j] = (gen, self.augment.prepare(batch_rows, self.dim, gen, torch.float32, self.gather))
        work.prepared = prepared
        return work
