"""Epoch orders: pure functions of (entries, geometry, seed, epoch) with an explicit generator.

Two shuffles, chosen by `m2m.stream.order.choose_layout`:

* **full** — a uniform random permutation of the entries. Every batch is a uniform sample of the
  lake, but consecutive rows live anywhere, so each batch touches ~``batch_size`` different
  blocks: this is only fast when the whole lake is resident in RAM (the warm tier, or the page
  cache of a memory-mapped lake).
* **block** — the lake is cut into contiguous blocks of ``block_rows`` rows; the blocks are
  permuted, grouped into windows of ``window_blocks`` consecutive (permuted) blocks, and the
  entries of each window are permuted among themselves. Only one window (plus the next one,
  being read ahead) must be resident, and every block is read once, sequentially, per epoch.
  The price is locality: a batch holds rows of one window (``window_blocks`` blocks) rather than
  of the whole lake, so rows from the same block are correlated across nearby batches. With the
  warm budget a quarter of which forms a window, a 4x-out-of-core lake still mixes each batch
  over 1/16 of the lake; a lake far larger than RAM mixes over fewer blocks.

Entries are global row positions (``arange(n)`` for a uniform epoch, or an importance plan's
draw, which may repeat rows); the functions return *indices into the entries* so companion
arrays (importance weights) follow the same order.
"""

from __future__ import annotations

import numpy as np

from m2m.errors import ConfigError

FULL = "full"
BLOCK = "block"
SEQUENTIAL = "sequential"

_SALT_SHUFFLE = 0x5EED


def epoch_generator(seed: int, epoch: int, salt: int = _SALT_SHUFFLE) -> np.random.Generator:
    """The generator of one epoch's order: a pure function of (seed, epoch, salt)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(salt)]))


def full_shuffle(num_entries: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform random permutation of ``range(num_entries)`` (int64)."""
    return rng.permutation(num_entries).astype(np.int64, copy=False)


def block_shuffle(entries: np.ndarray, block_rows: int, window_blocks: int, num_rows: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Indices into ``entries`` (global rows) ordered by permuted blocks, shuffled within windows.

    Blocks are ``[b * block_rows, (b + 1) * block_rows)`` of ``num_rows`` rows; window ``w`` holds
    the blocks at positions ``[w * window_blocks, (w + 1) * window_blocks)`` of the block
    permutation. Within a window the order is uniformly random.
    """
    if block_rows < 1 or window_blocks < 1:
        raise ConfigError(f"block_rows and window_blocks must be >= 1, got {block_rows}, {window_blocks}")
    entries = np.asarray(entries, dtype=np.int64)
    num_blocks = max(1, -(-num_rows // block_rows))
    position = np.empty(num_blocks, dtype=np.int64)
    position[rng.permutation(num_blocks)] = np.arange(num_blocks, dtype=np.int64)
    window = position[entries // block_rows] // window_blocks
    key = (window << 32) | rng.integers(0, 1 << 32, size=len(entries), dtype=np.int64)
    return np.argsort(key, kind="stable").astype(np.int64, copy=False)
