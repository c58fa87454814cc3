"""Exact Gaussian, Gamma and uniform draws for the samplers, from one stream per batch.

``HostNoise`` is a numpy SFC64 stream seeded from the batch's torch generator: the small float64
draws of the chains (Gaussians, uniforms, Gamma) come from it in bulk without torch's per-call cost,
and its large float32 Gaussian fills (d numbers per row, most of an augmented row's cost) are a
float32 Box-Muller over raw 64-bit words of a second SFC64 stream seeded once from the first: the
same transform and uniform resolution as torch's CPU ``normal_`` (24-bit uniforms, u1 in (0, 1]),
with numpy's vectorised float32 log/sin/cos, which measured 1.4-1.5x faster than torch's fill
(docs/geometry.md, "Where the time goes, and the CPU noise source"). On other devices torch's own
generator is used.

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

__all__ = ["HostNoise", "Source", "box_muller_", "normal_"]

_TWO_PI_2_32 = np.float32(2.0 * np.pi / 2.0**32)
_2_24 = np.float32(2.0**-24)


def box_muller_(out: np.ndarray, words: np.random.BitGenerator) -> np.ndarray:
    """Fill the 1-D float32 array ``out`` with independent N(0, 1) draws from ``words``' raw output.

    Box-Muller on pairs (u1, u2) of 32-bit words: u1 = (top 24 bits + 1) / 2^24 in (0, 1] (never 0,
    so the log is finite: |x| <= 5.77, as with torch's float ``normal_``), angle = 2 pi u2; the pair
    gives r cos and r sin, two independent N(0, 1). Every pass is one numpy float32 ufunc, vectorised
    and run on the calling thread.
    """
    n = out.size
    if n == 0:
        return out
    m = (n + 1) // 2                                   # pairs; an odd n drops one sine
    bits = words.random_raw(m).view(np.uint32)        # 2m fresh words, owned here
    k1, k2 = bits[:m], bits[m:]
    r = out[:m]
    np.right_shift(k1, 8, out=k1)
    np.add(k1, 1, out=k1)                              # 1 .. 2^24
    np.multiply(k1, _2_24, out=r, dtype=np.float32)   # exact: u1 in (0, 1]
    np.log(r, out=r)
    np.multiply(r, np.float32(-2.0), out=r)
    np.sqrt(r, out=r)                                  # radius
    angle = np.multiply(k2, _TWO_PI_2_32, dtype=np.float32)
    sine = out[m:]
    np.sin(angle[: n - m], out=sine)
    np.multiply(sine, r[: n - m], out=sine)
    np.cos(angle, out=angle)
    np.multiply(r, angle, out=r)
    return out


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
        self._words: np.random.SFC64 | None = None      # for normal_, seeded on first use

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
        """Fill the contiguous float32 CPU tensor ``out`` with independent N(0, 1) draws (a float32
        Box-Muller, ``box_muller_``, over a second SFC64 stream seeded once from this one: how many
        Gaussians are drawn does not move this stream's other draws)."""
        if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
            raise ConfigError(f"HostNoise.normal_ fills contiguous float32 CPU tensors, got {out.dtype} "
                             f"on {out.device} (contiguous={out.is_contiguous()})")
        if out.numel() == 0:
            return out
        if self._words is None:
            # seeded like this stream, from 3 of its words (a SeedSequence costs ~3x as much per batch)
            self._words = np.random.SFC64(_Words(self.rng.bit_generator.random_raw(3)))  # type: ignore[arg-type]
        box_muller_(out.numpy().reshape(-1), self._words)
        return out

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
