"""`EpochSampler`: ``dl.sampler`` of a `m2m.stream.loader.StreamLoader`, the ``set_epoch`` hook DDP stacks call."""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Iterator

from torch.utils.data import DistributedSampler

if TYPE_CHECKING:
    from m2m.stream.loader import StreamLoader


class EpochSampler(DistributedSampler[int]):
    """``dl.sampler``: the loader shards rows over ranks itself, as a ``DistributedSampler`` would.

    ``dataloader.sampler.set_epoch(epoch)`` reaches the loader; Lightning injects no sampler. Weak reference to the
    loader: a strong one would make every loader a cycle, freed late by the collector. Iterating it yields None
    forever, like torch's placeholder sampler of an iterable dataset.
    """

    def __init__(self, loader: "StreamLoader") -> None:  # no super().__init__: there is no index space
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> "StreamLoader | None":
        return self._loader()

    def set_epoch(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield None

    def __len__(self) -> int:
        loader = self._loader()
        return 0 if loader is None else len(loader)
