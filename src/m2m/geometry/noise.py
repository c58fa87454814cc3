"""Exact Gaussian, Gamma and uniform draws for the samplers, from one stream per batch.

``HostNoise`` is a numpy SFC64 stream seeded from the batch's torch generator: the small float64
draws of the chains (Gaussians, uniforms, Gamma) come from it in bulk without torch's per-call cost,
and its large float32 Gaussian fills (d numbers per row, most of an augmented row's cost) use
torch's vectorised Box-Muller on one torch generator seeded once from the stream, which measured
faster than numpy's log/sin/cos Box-Muller on this machine (docs/geometry.md,
"Where the time goes, and the CPU noise source"). On other
devices torch's own generator is used.

Both sources are deterministic functions of the torch generator passed in: ``HostNoise.of``
draws a 192-bit seed from it, so a batch generator seeded from (seed, epoch, rank, batch) still
fixes every sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.random.bit_generator import ISeedSequence
from torch import Tensor

from m2m.errors import ConfigError

__all__ = ["HostNoise", "Source", "normal_"]


class _Words(ISeedSequence):
    """Hands fixed uint64 words to a numpy bit generator as its seed state."""

    def __init__(self, words: np.ndarray) -> None:
        self.words = np.asarray(words, dtype=np.uint64)

    def generate_state(self, n_words: int, dtype: Any = np.uint32) -> np.ndarray:
        if np.dtype(dtype) != np.uint64 or n_words > self.words.size:
            raise ConfigError(f"seed holds {self.words.size} uint64 words; asked for {n_words} x {np.dtype(dtype)}")
        return self.words[:n_words].copy()


class HostNoise:
    """A numpy SFC64 stream seeded from a torch generator (CPU draws).

    ``normal_`` fills float32 CPU tensors; ``standard_normal``, ``uniform`` and ``standard_gamma``
    return float64 numpy arrays (small arrays: the per-row scalars of a chain).
    """

    def __init__(self, seed: np.ndarray) -> None:
        """``seed``: 3 uint64 words, used as SFC64's state (which then runs its 12 warm-up rounds)."""
        # numpy accepts any ISeedSequence here; its stubs list only SeedSequence
        self.rng = np.random.Generator(np.random.SFC64(_Words(seed)))  # type: ignore[arg-type]
        self._torch: torch.Generator | None = None      # for normal_, made on first use

    @classmethod
    def of(cls, source: Source) -> "HostNoise":
        """``source`` itself if it is a HostNoise, else a stream determined by (and advancing) the
        torch generator ``source`` (torch's default CPU generator if None)."""
        if isinstance(source, HostNoise):
            return source
        device = "cpu" if source is None else source.device
        seed = torch.randint(-2**63, 2**63 - 1, (3,), dtype=torch.int64, generator=source, device=device)
        return cls(seed.cpu().numpy().view(np.uint64))

    def torch_generator(self, device: torch.device | str) -> torch.Generator:
        """A torch generator on ``device`` seeded from this stream (for draws this class cannot make)."""
        gen = torch.Generator(device=device)
        gen.manual_seed(int(self.rng.integers(0, 2**63 - 1)))
        return gen

    def normal_(self, out: Tensor) -> Tensor:
        """Fill the contiguous float32 CPU tensor ``out`` with independent N(0, 1) draws (torch's
        vectorised Box-Muller, from one torch generator seeded once from this stream)."""
        if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
            raise ConfigError(f"HostNoise.normal_ fills contiguous float32 CPU tensors, got {out.dtype} "
                             f"on {out.device} (contiguous={out.is_contiguous()})")
        if out.numel() == 0:
            return out
        if self._torch is None:
            self._torch = self.torch_generator("cpu")
        return out.normal_(generator=self._torch)

    def standard_normal(self, size: tuple[int, ...]) -> np.ndarray:
        """float64 N(0, 1) draws (numpy's Ziggurat)."""
        return self.rng.standard_normal(size)

    def uniform(self, size: tuple[int, ...]) -> np.ndarray:
        """float64 U[0, 1) draws."""
        return self.rng.random(size)

    def standard_gamma(self, shape: float | np.ndarray, size: tuple[int, ...]) -> np.ndarray:
        """float64 Gamma(shape, 1) draws (numpy's Marsaglia-Tsang)."""
        return self.rng.standard_gamma(shape, size)


Source = torch.Generator | HostNoise | None
"""What the samplers draw from: a torch generator (on the tensors' device), a ``HostNoise`` stream
(CPU; one per batch avoids re-seeding) or None (torch's default generator)."""


def normal_(out: Tensor, source: Source = None) -> Tensor:
    """Fill ``out`` with N(0, 1) draws determined by ``source``.

    Contiguous float32 CPU tensors take the fast ``HostNoise`` path; anything else (other dtypes,
    CUDA, strided views) uses ``Tensor.normal_`` (with a generator seeded from ``source`` when
    that is a HostNoise).
    """
    if out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
        return HostNoise.of(source).normal_(out)
    gen = source.torch_generator(out.device) if isinstance(source, HostNoise) else source
    return out.normal_(generator=gen)
