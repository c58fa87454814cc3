"""Draw ahead: each batch's augmentation draws, made where the stage runs (the prefetch thread).

An augmentation with ``prepare`` (``m2m.stream.hooks.PreparedAugment``) splits its work into the
draws that do not read the batch's vectors and the rest. This stage makes the draws of every batch
of an item with the batch's own generator (``batch_generator``) and attaches them to the item; the
consumer applies them with the same generator object, so the result equals the in-line path exactly
and resume is unaffected (nothing here is state: draws are a function of the batch's coordinates).

Balancing: the largest draw (the direction Gaussians, ``draw_gaussian``) can be made on either side
with the same result. It is made here only while the consumer has items waiting (``backlog() > 0``:
the consumer, e.g. a training step, is the slower side); while the consumer waits for items, it is
left to the consumer, so the two threads share the work. The exact reruns of a Langevin item
(``LangevinAugmenter.rerun_ahead``) are always made here, from the item's vectors, in one chain over
all its batches: fewer, larger steps than a chain per batch (docs/geometry.md).
"""

from __future__ import annotations

from typing import Callable

import torch

from m2m.stream import columns as cols
from m2m.stream.hooks import Gather, PreparedAugment, batch_generator
from m2m.stream.stages.base import Stage, Work


class PrepareAugment(Stage):
    """Attaches ``{batch: (generator, augment.prepare(...))}`` to each item as ``work.prepared``."""

    def __init__(self, upstream: Stage, augment: PreparedAugment, batch_size: int, seed: int, rank: int,
                 dim: int, gather: Gather | None, backlog: Callable[[], int] | None = None) -> None:
        self.upstream = upstream
        self.augment = augment
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.dim = dim
        self.gather = gather
        self.backlog = backlog
        self.gaussian_items = 0

    def __next__(self) -> Work:
        assert self.upstream is not None
        work = next(self.upstream)
        rows = work.tensors[cols.ROWS]
        draw_gaussian = self.backlog is None or self.backlog() > 0
        self.gaussian_items += int(draw_gaussian)
        # the exact reruns of a Langevin item (``rerun_ahead``) are always made here, all its batches in
        # one chain: that costs less CPU than a chain per batch, and the chain (small numpy steps) holds
        # the GIL, so leaving it to a waiting consumer would not run it in parallel anyway
        rerun = getattr(self.augment, "rerun_ahead", None) if self.gather is not None else None
        vectors = work.tensors.get(cols.EMBEDDING) if rerun is not None else None
        if vectors is not None and vectors.dtype != torch.float32:    # the draws are made for float32
            vectors = None
        prepared = {}
        ahead = []
        for j in range(work.first, work.end):
            sl = work.batch_slice(j, self.batch_size)
            batch_rows = rows[sl]
            gen = batch_generator(self.seed, work.epoch, self.rank, j, batch_rows.device)
            draws = self.augment.prepare(batch_rows, self.dim, gen, torch.float32, self.gather, draw_gaussian)
            if vectors is not None:
                ahead.append((draws, vectors[sl], batch_rows, gen))
            prepared[j] = (gen, draws)
        if rerun is not None and ahead:
            rerun(ahead, self.gather)
        work.prepared = prepared
        return work
