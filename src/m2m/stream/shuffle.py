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


# ----------------------------------------------------------------- rank-local orders (large lakes)
#
# The functions above build the whole epoch's order (O(lake) memory and an O(lake log lake) sort on
# every rank). The ones below give the same kind of order for any slice of epoch positions, in
# memory and time proportional to the slice (plus O(blocks) for the block permutation), so a rank
# of a 1B-row lake builds only its own share. They define different (equally random) orders, used
# by `m2m.stream.order` from `order.RANK_LOCAL_ROWS` rows on.

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_FEISTEL_ROUNDS = 4


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijective avalanche of uint64, wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation_keys(seed: int, epoch: int, salt: int) -> np.ndarray:
    """The round keys of one epoch's keyed permutation (`feistel_permute`)."""
    seq = np.random.SeedSequence([int(seed), int(epoch), int(salt)])
    return seq.generate_state(_FEISTEL_ROUNDS, dtype=np.uint64)


def feistel_permute(positions: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """``pi(positions)`` for a keyed bijection ``pi`` of ``[0, n)`` (int64), O(1) memory per position.

    A balanced Feistel network on ``2h`` bits (the smallest even width with ``4^h >= n``) is a
    bijection of ``[0, 4^h)``; cycle-walking (apply it again while the value is ``>= n``) restricts
    it to a bijection of ``[0, n)``. Since ``4^h < 4n`` a walk takes fewer than 4 rounds on average.
    Any slice of positions can be mapped on its own: ``pi(arange(n))`` is a permutation.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    pos = np.asarray(positions, dtype=np.int64)
    if n <= 1 or pos.size == 0:
        return pos.copy()
    if pos.min() < 0 or pos.max() >= n:
        raise ConfigError(f"positions must lie in [0, {n})")
    half = max(1, -(-(int(n - 1).bit_length()) // 2))
    low = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    out = pos.astype(np.uint64)
    todo = np.arange(out.size)
    while todo.size:
        x = out[todo]
        left, right = x >> shift, x & low
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & low)
        x = (left << shift) | right
        out[todo] = x
        todo = todo[x >= np.uint64(n)]
    return out.astype(np.int64)


def window_table(num_rows: int, block_rows: int, window_blocks: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The block permutation of a block shuffle and the first epoch position of each window.

    Returns ``(blocks, starts)``: ``blocks`` int64 [num_blocks], the permuted block order (window
    ``w`` holds ``blocks[w * window_blocks:(w + 1) * window_blocks]``); ``starts`` int64
    [num_windows + 1], window ``w`` covering epoch positions ``[starts[w], starts[w + 1])``.
    O(blocks) memory: at 1B rows of 2,702-row blocks, 370k blocks.
    """
    if block_rows < 1 or window_blocks < 1:
        raise ConfigError(f"block_rows and window_blocks must be >= 1, got {block_rows}, {window_blocks}")
    num_blocks = max(1, -(-num_rows // block_rows))
    blocks = rng.permutation(num_blocks).astype(np.int64)
    sizes = np.minimum(block_rows, num_rows - blocks * block_rows).clip(min=0)
    per_window = np.add.reduceat(sizes, np.arange(0, num_blocks, window_blocks))
    starts = np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
    return blocks, starts


def window_rows(blocks: np.ndarray, window: int, block_rows: int, window_blocks: int, num_rows: int,
                seed: int, epoch: int, salt: int = _SALT_SHUFFLE) -> np.ndarray:
    """The global rows of window ``window`` of a block shuffle, in their random order within the window
    (a generator of its own per (seed, epoch, window), so any window is built alone)."""
    mine = blocks[window * window_blocks:(window + 1) * window_blocks]
    parts = [np.arange(b * block_rows, min((b + 1) * block_rows, num_rows), dtype=np.int64) for b in mine]
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(salt), int(window)]))
    return rows[rng.permutation(len(rows))]


def block_positions(positions: np.ndarray, blocks: np.ndarray, starts: np.ndarray, block_rows: int,
                    window_blocks: int, num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The global rows at epoch ``positions`` of the windowed block shuffle (`window_table`), building
    only the windows those positions fall in: O(positions + 2 windows) memory, not O(lake)."""
    pos = np.asarray(positions, dtype=np.int64)
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64)
    win = np.searchsorted(starts, pos, side="right") - 1
    by = np.argsort(win, kind="stable") if np.any(win[1:] < win[:-1]) else None  # a wrapped (padded) slice
    ordered = win if by is None else win[by]
    touched, first = np.unique(ordered, return_index=True)
    bounds = np.append(first, ordered.size)
    out = np.empty(pos.size, dtype=np.int64)
    for i, w in enumerate(touched.tolist()):
        sel = slice(int(bounds[i]), int(bounds[i + 1])) if by is None else by[bounds[i]:bounds[i + 1]]
        rows = window_rows(blocks, w, block_rows, window_blocks, num_rows, seed, epoch)
        out[sel] = rows[pos[sel] - starts[w]]
    return out
