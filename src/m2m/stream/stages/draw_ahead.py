"""Draw ahead: each batch's augmentation draws, made where the stage runs (the prefetch thread).

An augmentation with ``prepare`` (``m2m.stream.hooks.PreparedAugment``) splits its work into the
draws that do not read the batch's vectors and the rest. This stage makes the draws of every batch
of an item with the batch's own generator (``batch_generator``) and attaches them to the item; the
consumer applies them with the same generator object, so the result equals the in-line path exactly
and resume is unaffected (nothing here is state: draws are a function of the batch's coordinates).

Balancing: the largest draw (the direction Gaussians, ``draw_gaussian``) and the exact reruns of a
Langevin item (``LangevinAugmenter.rerun_ahead``, one chain over all the item's batches: fewer, larger
steps than a chain per batch, docs/geometry.md) can be made on either side with the same result. They
are made here only while the consumer has items waiting (``backlog() > 0``: the consumer, e.g. a
training step, is the slower side); while the consumer waits for items, both are left to it (the
reruns by `rerun_item` when it takes the item, still one chain per item), so the two threads share the
work. Without a backlog to read (a DataLoader worker) everything is made here.
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
        here = self.backlog is None or self.backlog() > 0   # the consumer is the slower side
        self.gaussian_items += int(here)
        prepared = {}
        for j in range(work.first, work.end):
            batch_rows = rows[work.batch_slice(j, self.batch_size)]
            gen = batch_generator(self.seed, work.epoch, self.rank, j, batch_rows.device)
            prepared[j] = (gen, self.augment.prepare(batch_rows, self.dim, gen, torch.float32, self.gather, here))
        work.prepared = prepared
        if here:
            rerun_item(self.augment, work, self.batch_size, self.gather)
        return work


def rerun_item(augment: object, work: Work, batch_size: int, gather: Gather | None) -> None:
    """The exact reruns of every batch of ``work`` whose draws need them (``work.prepared``), in one
    ``rerun_ahead`` chain; nothing for an augmentation without reruns, or an item whose vectors are not
    float32 (the draws are made for float32: each batch's call then reruns its own rows)."""
    rerun = getattr(augment, "rerun_ahead", None)
    vectors = work.tensors.get(cols.EMBEDDING)
    if rerun is None or gather is None or work.prepared is None or vectors is None or vectors.dtype != torch.float32:
        return
    rows = work.tensors[cols.ROWS]
    ahead = []
    for j, (gen, draws) in work.prepared.items():
        sl = work.batch_slice(j, batch_size)
        ahead.append((draws, vectors[sl], rows[sl], gen))
    if ahead:
        rerun(ahead, gather)
