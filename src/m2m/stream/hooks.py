"""The augmentation hook: replaces each batch's embeddings on the batch's device."""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Callable, Protocol, runtime_checkable

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]
"""``gather(positions: LongTensor[n]) -> float32 [n, d]`` rows of ``mu`` on the batch's device, in a new
tensor the caller owns (it may write into it)."""


@runtime_checkable
class Augment(Protocol):
    """Called once per batch, after the batch reached its device (in the consuming process, or see ``in_workers``).

    ``x``: float32 ``[B, d]`` embeddings; ``rows``: int64 ``[B]`` their global row positions;
    ``gather``: reads any rows of ``mu`` (e.g. neighbours) from the fastest tier; ``generator``:
    seeded from (seed, epoch, rank, batch index), so a resumed run draws the same samples.
    Returns the new float32 ``[B, d]`` embeddings (labels and ids stay those of ``rows``).

    An augmentation may also define ``prepare(rows, dim, generator, dtype, gather, draw_gaussian)
    -> draws`` (see ``PreparedAugment``): the draws that do not read ``x`` (``draw_gaussian=False``:
    all but the largest, which ``__call__`` then makes, with the same result). On CPU streams with
    a prefetch thread the stream calls it there, one batch ahead, and then
    ``__call__(..., prepared=draws)`` in the consumer, which must return what ``__call__`` without
    ``prepared`` returns.

    An augmentation whose class sets ``in_workers = True`` (m2m's augmenters do) is applied in the
    DataLoader workers of a CPU stream with ``num_workers > 0`` rather than in the consumer (the same
    batches, made in parallel): it must then be picklable (spawned workers) and keep no state the
    consumer reads. Without it the consumer augments every batch, as on a GPU. Such an augmentation
    may also define ``build_tables(dim, gather)``: the stream calls it in the consumer before it
    forks workers, which then inherit what it built instead of each building it every pass.
    """

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, gather: Gather,
                 generator: torch.Generator) -> torch.Tensor: ...


@runtime_checkable
class PreparedAugment(Protocol):
    """An ``Augment`` whose draws can be made ahead, off the consuming thread."""

    def prepare(self, rows: torch.Tensor, dim: int, generator: torch.Generator, dtype: torch.dtype,
                gather: Gather | None, draw_gaussian: bool = True) -> Any: ...

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, gather: Gather, generator: torch.Generator,
                 prepared: Any = None) -> torch.Tensor: ...


_AUGMENT_SALT = 0xA06


def augment_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """Seed (63 bits) of the augmentation generator of one batch: a hash of its coordinates."""
    key = struct.pack("<5Q", *(int(v) & 0xFFFF_FFFF_FFFF_FFFF for v in (seed, epoch, rank, batch, _AUGMENT_SALT)))
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def batch_generator(seed: int, epoch: int, rank: int, batch: int, device: torch.device) -> torch.Generator:
    """The augmentation generator of one batch on ``device``, seeded by ``augment_seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(augment_seed(seed, epoch, rank, batch))
    return gen
