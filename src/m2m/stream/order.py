"""One rank's epoch: which global rows, in which batches, with which importance weights.

`choose_layout` picks the shuffle (see `m2m.stream.shuffle`) from sizes and the warm budget only,
so every rank and worker derives the same layout; `rank_epoch` is a pure function of
(layout, sizes, seed, epoch, rank, world_size, plan). Lakes of `RANK_LOCAL_ROWS` rows or more use
rank-local orders (`local_rows`): a rank builds its own positions of the epoch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m2m.errors import ConfigError
from m2m.stream import partition, shuffle

DEFAULT_BLOCK_BYTES = 4 << 20
WINDOW_FRACTION = 4  # a window is 1/4 of the warm budget: current + next + slack fit in it
MODES = ("auto", shuffle.FULL, shuffle.BLOCK)
#: From this many rows on, a rank builds only its own share of a uniform epoch's order (`local_rows`)
#: instead of the whole order: at 1B rows the whole order is 8 GB and a sort on every rank. Below it
#: the whole-epoch orders of `epoch_entries` are kept, so the orders (and saved states) of such lakes
#: do not change.
RANK_LOCAL_ROWS = 1 << 24
_SALT_LOCAL = 0x10CA1


@dataclass(frozen=True)
class Layout:
    """How an epoch is shuffled: ``mode``, block size and window size (in blocks)."""

    mode: str
    block_rows: int
    window_blocks: int


def choose_layout(num_rows: int, row_bytes: int, warm_bytes: int, shuffle_rows: bool, mode: str = "auto",
                  block_rows: int | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Layout:
    """Full shuffle when the lake fits ``warm_bytes``, else a block shuffle with windows of 1/4 of it.

    Blocks default to ~``block_bytes`` of rows (no more than the lake has).
    """
    if mode not in MODES:
        raise ConfigError(f"shuffle_mode must be one of {MODES}, got {mode!r}")
    if block_rows is None:
        block_rows = max(1, min(block_bytes // max(1, row_bytes), num_rows))
    if not isinstance(block_rows, int) or block_rows < 1:
        raise ConfigError(f"block_rows must be an int >= 1, got {block_rows!r}")
    window_blocks = max(1, (warm_bytes // WINDOW_FRACTION) // max(1, block_rows * row_bytes))
    if not shuffle_rows:
        chosen = shuffle.SEQUENTIAL
    elif mode == "auto":
        chosen = shuffle.FULL if num_rows * row_bytes <= warm_bytes else shuffle.BLOCK
    else:
        chosen = mode
    return Layout(chosen, block_rows, window_blocks)


@dataclass(frozen=True)
class RankEpoch:
    """The rows (global positions) and weights one rank reads in one epoch, in order."""

    rows: np.ndarray
    weights: np.ndarray | None
    batch_size: int
    num_batches: int

    def batch_range(self, first: int, end: int) -> tuple[int, int]:
        """Row range within ``rows`` of batches ``first..end-1``."""
        return partition.batch_bounds(first, end, len(self.rows), self.batch_size)


def epoch_entries(layout: Layout, num_rows: int, seed: int, epoch: int,
                  plan: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole epoch's order of global rows (all ranks) and its weights (None = all 1.0)."""
    rng = shuffle.epoch_generator(seed, epoch)
    if plan is None:
        if layout.mode == shuffle.FULL:
            return shuffle.full_shuffle(num_rows, rng), None
        if layout.mode == shuffle.BLOCK:
            return shuffle.block_shuffle(np.arange(num_rows, dtype=np.int64), layout.block_rows,
                                         layout.window_blocks, num_rows, rng), None
        return np.arange(num_rows, dtype=np.int64), None
    rows, weights = plan
    if layout.mode == shuffle.BLOCK:
        idx = shuffle.block_shuffle(rows, layout.block_rows, layout.window_blocks, num_rows, rng)
        return rows[idx], weights[idx]
    return rows, weights


def delivered_draws(num_rows: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """How many plan entries an epoch over ``world_size`` ranks delivers, each exactly once.

    With ``drop_last`` every rank reads the same whole number of batches: floor(N / (W B)) W B
    entries. Without it the order is padded to a multiple of W: W ceil(N / W). A plan of exactly
    this many draws is split by `m2m.stream.partition` with nothing dropped and nothing repeated.
    """
    if drop_last:
        return (num_rows // (world_size * batch_size)) * world_size * batch_size
    return -(-num_rows // world_size) * world_size


def sampler_plan(sampler: object, epoch: int, num_rows: int, batch_size: int, world_size: int,
                 drop_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """``sampler.plan(epoch)``, asking for exactly the delivered draws when the sampler accepts
    ``num_draws`` (`m2m.sampling.plan.accepts_num_draws`); validated by ``check_plan``."""
    from m2m.sampling.plan import accepts_num_draws

    if accepts_num_draws(sampler):
        # samplers are duck-typed: anything with plan(epoch[, num_draws])
        raw = sampler.plan(epoch, num_draws=delivered_draws(num_rows, batch_size, world_size, drop_last))  # type: ignore[attr-defined]
    else:
        # samplers are duck-typed: anything with plan(epoch[, num_draws])
        raw = sampler.plan(epoch)  # type: ignore[attr-defined]
    return check_plan(raw, num_rows)


def rank_local(num_rows: int) -> bool:
    """Whether a lake of ``num_rows`` rows uses the rank-local orders (from `RANK_LOCAL_ROWS` rows on)."""
    return num_rows >= RANK_LOCAL_ROWS


def rank_epoch(layout: Layout, num_rows: int, batch_size: int, drop_last: bool, seed: int, epoch: int,
               rank: int, world_size: int, plan: tuple[np.ndarray, np.ndarray] | None = None,
               local: bool | None = None) -> RankEpoch:
    """The part of epoch ``epoch`` that ``rank`` of ``world_size`` reads (see `m2m.stream.partition`).

    ``local`` (default: `rank_local` of ``num_rows``): without a plan, build only this rank's
    positions of the epoch order (`local_rows`) instead of the whole order; a different, equally
    random order. A plan (the whole epoch's draws, already in memory) is always ordered whole.
    """
    if plan is None and (rank_local(num_rows) if local is None else local):
        pos = partition.rank_positions(num_rows, batch_size, rank, world_size, drop_last)
        n = partition.num_batches(len(pos), batch_size, drop_last)
        return RankEpoch(local_rows(layout, num_rows, seed, epoch, pos), None, batch_size, n)
    rows, weights = epoch_entries(layout, num_rows, seed, epoch, plan)
    pos = partition.rank_positions(len(rows), batch_size, rank, world_size, drop_last)
    n = partition.num_batches(len(pos), batch_size, drop_last)
    return RankEpoch(rows[pos], None if weights is None else weights[pos], batch_size, n)


def local_rows(layout: Layout, num_rows: int, seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """The global rows at epoch ``positions`` of the rank-local order of ``layout``, built in memory and
    time proportional to ``positions`` (plus O(blocks) for a block shuffle's block permutation).

    full: a keyed bijection of ``[0, num_rows)`` (`shuffle.feistel_permute`) evaluated at the positions;
    block: the windowed block shuffle, building only the windows the positions fall in
    (`shuffle.block_positions`); sequential: the positions themselves.
    """
    pos = np.asarray(positions, dtype=np.int64)
    if layout.mode == shuffle.FULL:
        return shuffle.feistel_permute(pos, num_rows, shuffle.permutation_keys(seed, epoch, _SALT_LOCAL))
    if layout.mode == shuffle.BLOCK:
        rng = shuffle.epoch_generator(seed, epoch, _SALT_LOCAL)
        blocks, starts = shuffle.window_table(num_rows, layout.block_rows, layout.window_blocks, rng)
        return shuffle.block_positions(pos, blocks, starts, layout.block_rows, layout.window_blocks, num_rows,
                                       seed, epoch)
    return pos.copy()


def check_plan(plan: object, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a sampler's ``plan(epoch)`` result: int64 rows in range and float32 weights."""
    if not isinstance(plan, tuple) or len(plan) != 2:
        raise ConfigError(f"PlanSampler.plan must return (rows, weights), got {type(plan).__name__}")
    rows = np.asarray(plan[0])
    weights = np.asarray(plan[1], dtype=np.float32)
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise ConfigError(f"plan rows must be a 1-D int array, got dtype {rows.dtype} shape {rows.shape}")
    if weights.shape != rows.shape:
        raise ConfigError(f"plan weights shape {weights.shape} != rows shape {rows.shape}")
    rows = rows.astype(np.int64, copy=False)
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        bad = int(np.flatnonzero((rows < 0) | (rows >= num_rows))[0])
        raise ConfigError(f"plan row {int(rows[bad])} at position {bad} is outside [0, {num_rows})")
    if not np.all(np.isfinite(weights)) or (len(weights) and weights.min() < 0):
        bad = int(np.flatnonzero(~np.isfinite(weights) | (weights < 0))[0])
        raise ConfigError(f"plan weight {float(weights[bad])} at position {bad} is not finite and >= 0")
    return rows, weights
