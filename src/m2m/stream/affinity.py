"""Shard affinity: in a block-shuffled epoch, each rank streams a disjoint set of whole shards.

With the plain block shuffle (`m2m.stream.order.rank_epoch`) every rank's contiguous slice of the
epoch order still holds blocks from all over the lake, so each of W ranks (nodes) downloads about
the whole remote lake per epoch: W x the lake. With shard affinity the shards are cut into
``world_size * RUNS_PER_RANK`` runs of consecutive shards, the epoch's entries are grouped by run in
a random run order (fresh every epoch, so the shards a rank sees rotate across epochs) and by shard
within a run, the ranks take contiguous equal slices of that grouped order exactly as
`m2m.stream.partition` cuts any order (same padding / ``drop_last`` rule, so every rank yields the
same number of batches and the epoch covers every entry exactly once, plus fewer than W padding
rows), and each rank block-shuffles its own slice within windows, in groups of a few shards that fit the
node cache (`group_shuffle`).
A rank therefore reads only its own ~1/W of the shards, plus the two shards it shares with its
neighbours in the order (its slice starts and ends inside shards) and, when the epoch is padded,
the first shard of the order on the last rank. Runs, not single shards, because the warm arena
loads whole blocks of ``block_rows`` rows, and a block straddling two shards downloads both: inside
a run the neighbouring shards are the rank's own, so only the two ends of the rank's part of each run
it touches can pull in a foreign shard. `extra_shards_bound` is the resulting bound on a rank's
shards beyond its 1/W share: ``2 * T + 3`` with T the runs one slice can touch, T <= RUNS_PER_RANK
+ 1 when the runs hold about equal rows (13 shards; 2026-12-06: the bound said ``2 * RUNS_PER_RANK
+ 2`` until a 4-rank test and a pure simulation needed 11.3), more in a lake with few shards per
run (1-2 shards per run: runs of unequal rows; 13.7 shards for 8 ranks of 59 shards). Across all
ranks: ~1x the lake per epoch plus those extra shards (at 1B x 768 on 32 ranks, at most ~3.6%;
1.7% simulated: docs/scale.md).

The price: a rank's batches mix rows of its ~1/W of the shards only (within a window, as in any
block shuffle), and which shards a rank gets changes each epoch, so a node cache smaller than the
lake gets no reuse across epochs. Pure function of (layout, shard offsets, sizes, seed, epoch,
rank, world size, plan).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from m2m.errors import ConfigError
from m2m.stream import partition, shuffle
from m2m.stream.order import Layout, RankEpoch

if TYPE_CHECKING:  # pragma: no cover
    from m2m.sampling.sharded import ShardedPlanSampler

RUNS_PER_RANK = 4
_SALT_SHARDS = 0xAFF1
_SALT_WINDOWS = 0xAFF2


def shard_order(num_shards: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of shard indices (the same on every rank): runs of consecutive shards in a
    random order, ascending within a run."""
    runs = max(1, min(num_shards, world_size * RUNS_PER_RANK))
    run_of_shard = (np.arange(num_shards, dtype=np.int64) * runs) // max(num_shards, 1)
    position = np.empty(runs, dtype=np.int64)
    position[shuffle.full_shuffle(runs, shuffle.epoch_generator(seed, epoch, _SALT_SHARDS))] = np.arange(runs)
    return np.argsort(position[run_of_shard], kind="stable").astype(np.int64, copy=False)


def grouped_entries(entries: np.ndarray, shard_offsets: np.ndarray, world_size: int, seed: int,
                    epoch: int) -> np.ndarray:
    """Indices into ``entries`` (global rows) grouped by shard, shards in `shard_order`; within a
    shard the entries keep their order (ascending rows, or an importance plan's random draw)."""
    offsets = np.asarray(shard_offsets, dtype=np.int64)
    num_shards = len(offsets) - 1
    position = np.empty(max(num_shards, 0), dtype=np.int64)
    position[shard_order(num_shards, world_size, seed, epoch)] = np.arange(num_shards, dtype=np.int64)
    shard = np.searchsorted(offsets, entries, side="right") - 1
    return np.argsort(position[shard], kind="stable").astype(np.int64, copy=False)


def group_shuffle(entries: np.ndarray, block_rows: int, window_blocks: int, group_blocks: int | None,
                  rng: np.random.Generator) -> np.ndarray:
    """Indices into ``entries`` (a rank's rows, grouped by shard) in a cache-friendly block shuffle.

    The blocks, in the order the entries first reach them, are cut into groups of ``group_blocks``
    consecutive blocks (a few whole shards; None: one group); groups come in random order; inside a
    group the blocks are permuted and cut into windows of ``window_blocks``, and the entries of a
    window are shuffled. Each shard thus lives in one group (two at a group boundary), and a node
    cache holding one group downloads it about once per epoch; one group is the plain block shuffle.
    """
    if block_rows < 1 or window_blocks < 1:
        raise ConfigError(f"block_rows and window_blocks must be >= 1, got {block_rows}, {window_blocks}")
    entries = np.asarray(entries, dtype=np.int64)
    if len(entries) == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, first, inv = np.unique(entries // block_rows, return_index=True, return_inverse=True)
    nb = len(uniq)
    seq = np.empty(nb, dtype=np.int64)
    seq[np.argsort(first, kind="stable")] = np.arange(nb, dtype=np.int64)
    group_blocks = nb if not group_blocks else max(int(group_blocks), window_blocks)
    group = seq // group_blocks
    ngroups = int(group.max()) + 1
    gpos = np.empty(ngroups, dtype=np.int64)
    gpos[rng.permutation(ngroups)] = np.arange(ngroups, dtype=np.int64)
    by = np.lexsort((rng.permutation(nb), group))                  # blocks: by group, random within it
    starts = np.searchsorted(group[by], np.arange(ngroups))
    within = np.empty(nb, dtype=np.int64)
    within[by] = np.arange(nb, dtype=np.int64) - starts[group[by]]
    windows_per_group = -(-group_blocks // window_blocks)
    block_key = gpos[group] * windows_per_group + within // window_blocks
    key = (block_key[inv.reshape(-1)] << 32) | rng.integers(0, 1 << 32, size=len(entries), dtype=np.int64)
    return np.argsort(key, kind="stable").astype(np.int64, copy=False)


def rank_epoch(layout: Layout, shard_offsets: np.ndarray, batch_size: int, drop_last: bool, seed: int,
               epoch: int, rank: int, world_size: int,
               plan: tuple[np.ndarray, np.ndarray] | None = None, group_blocks: int | None = None) -> RankEpoch:
    """The part of epoch ``epoch`` that ``rank`` of ``world_size`` reads, with shard affinity, its
    rows block-shuffled by `group_shuffle` (``group_blocks``: blocks per group, None = one group).

    Without a plan only this rank's rows are ever built (memory and time ~ rows per rank, not the
    whole lake: at 1B rows on 32 ranks that is 31M rows per rank)."""
    offsets = np.asarray(shard_offsets, dtype=np.int64)
    num_rows = int(offsets[-1])
    pos = partition.rank_positions(len(plan[0]) if plan is not None else num_rows, batch_size, rank, world_size,
                                   drop_last)
    n = partition.num_batches(len(pos), batch_size, drop_last)
    rng = shuffle.epoch_generator(seed, epoch, (_SALT_WINDOWS << 24) + int(rank))
    if plan is None:
        order = shard_order(len(offsets) - 1, world_size, seed, epoch)
        starts = np.concatenate([[0], np.cumsum(np.diff(offsets)[order])]).astype(np.int64)
        k = np.searchsorted(starts, pos, side="right") - 1          # position in the grouped order -> row
        rows = offsets[order[k]] + (pos - starts[k])
        rows = rows[group_shuffle(rows, layout.block_rows, layout.window_blocks, group_blocks, rng)]
        return RankEpoch(rows, None, batch_size, n)
    entries, weights = plan
    mine = grouped_entries(entries, offsets, world_size, seed, epoch)[pos]
    mine = mine[group_shuffle(entries[mine], layout.block_rows, layout.window_blocks, group_blocks, rng)]
    return RankEpoch(entries[mine], weights[mine], batch_size, n)


def run_rows(shard_offsets: np.ndarray, world_size: int) -> np.ndarray:
    """Rows per run of consecutive shards (`shard_order`'s runs, in shard order)."""
    offsets = np.asarray(shard_offsets, dtype=np.int64)
    num_shards = len(offsets) - 1
    runs = max(1, min(num_shards, world_size * RUNS_PER_RANK))
    run_of_shard = (np.arange(num_shards, dtype=np.int64) * runs) // max(num_shards, 1)
    return np.bincount(run_of_shard, weights=np.diff(offsets), minlength=runs).astype(np.int64)


def extra_shards_bound(shard_offsets: np.ndarray, world_size: int, drop_last: bool = False) -> int:
    """Most shards one rank's warm arena reads beyond its share of the bytes (``lake / W``), in units
    of the biggest shard, whatever the seed, epoch, rank or block size.

    A rank's slice of the epoch order (``ceil(rows / W)`` positions) covers some runs whole and two in
    part: at most ``T = k + 2`` runs, k the most runs whose rows fit in a slice (the smallest ones: the
    run order is random). Each run touched has two ends to the rank's part of it, and a block
    straddling one can load a foreign shard (2T); the slice's two ends fall inside shards, read whole
    (2); a padded epoch's last rank reads the first shard of the order again (1). For blocks no bigger
    than the smallest shard (a bigger block can pull in several small foreign shards at one end);
    epochs without an importance plan (a plan's draws are not spread over runs by rows)."""
    offsets = np.asarray(shard_offsets, dtype=np.int64)
    num_rows = int(offsets[-1]) if len(offsets) else 0
    if num_rows == 0:
        return 0
    slice_rows = num_rows // world_size if drop_last else -(-num_rows // world_size)
    smallest = np.cumsum(np.sort(run_rows(offsets, world_size)))
    whole = int(np.searchsorted(smallest, slice_rows, side="right"))
    return 2 * (whole + 2) + 3


def block_shards(rows: np.ndarray, block_rows: int, shard_offsets: np.ndarray) -> np.ndarray:
    """The shards the warm arena downloads to deliver ``rows``: those of every whole ``block_rows``
    block holding one of them (a block straddling two shards loads both)."""
    offsets = np.asarray(shard_offsets, dtype=np.int64)
    blocks = np.unique(np.asarray(rows, dtype=np.int64) // block_rows)
    first = blocks * block_rows
    lo = np.searchsorted(offsets, first, side="right") - 1
    hi = np.searchsorted(offsets, np.minimum(first + block_rows, offsets[-1]) - 1, side="right") - 1
    span = hi - lo + 1                                   # a block may cover shards smaller than itself
    return np.unique(np.repeat(lo, span) + (np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span)))


def shards_of(rows: np.ndarray, shard_offsets: np.ndarray) -> np.ndarray:
    """The distinct shards holding ``rows`` (what a rank downloads)."""
    offsets = np.asarray(shard_offsets, dtype=np.int64)
    return np.unique(np.searchsorted(offsets, np.asarray(rows, dtype=np.int64), side="right") - 1)


def first_use(rows: np.ndarray, shard_offsets: np.ndarray) -> np.ndarray:
    """The shards holding ``rows``, in the order a stream first reads them (its download order)."""
    offsets = np.asarray(shard_offsets, dtype=np.int64)
    shard = np.searchsorted(offsets, np.asarray(rows, dtype=np.int64), side="right") - 1
    _, first = np.unique(shard, return_index=True)
    return shard[np.sort(first)]


def rank_epoch_sharded(layout: Layout, shard_offsets: np.ndarray, batch_size: int, drop_last: bool, seed: int,
                       epoch: int, rank: int, world_size: int, sampler: "ShardedPlanSampler", num_draws: int,
                       group_blocks: int | None = None) -> RankEpoch:
    """`rank_epoch` with an importance plan drawn per shard (`m2m.sampling.sharded`): the epoch's
    ``num_draws`` draws, grouped by shard in `shard_order` (shard ``s`` holding its
    ``sampler.shard_counts`` draws), are cut over the ranks as any order is, and this rank computes
    the draws of only the shards its slice covers. Memory and time ~ the rank's share plus O(shards),
    never the whole plan."""
    offsets = np.asarray(shard_offsets, dtype=np.int64)
    counts = np.asarray(sampler.shard_counts(epoch, num_draws), dtype=np.int64)
    order = shard_order(len(offsets) - 1, world_size, seed, epoch)
    starts = np.concatenate([[0], np.cumsum(counts[order])]).astype(np.int64)
    pos = partition.rank_positions(int(starts[-1]), batch_size, rank, world_size, drop_last)
    n = partition.num_batches(len(pos), batch_size, drop_last)
    k = np.searchsorted(starts, pos, side="right") - 1              # position -> index in the shard order
    touched = np.unique(k)
    base = np.zeros(len(touched) + 1, dtype=np.int64)
    rows_parts, weight_parts = [], []
    for i, j in enumerate(touched.tolist()):
        shard = int(order[j])
        r, w = sampler.shard_draws(epoch, shard, int(counts[shard]), num_draws)
        rows_parts.append(r)
        weight_parts.append(w)
        base[i + 1] = base[i] + len(r)
    entries = np.concatenate(rows_parts) if rows_parts else np.zeros(0, np.int64)
    weights = np.concatenate(weight_parts) if weight_parts else np.zeros(0, np.float32)
    at = base[np.searchsorted(touched, k)] + (pos - starts[k])
    del rows_parts, weight_parts, k
    rows, weights = entries[at], weights[at]
    del entries, at
    rng = shuffle.epoch_generator(seed, epoch, (_SALT_WINDOWS << 24) + int(rank))
    mine = group_shuffle(rows, layout.block_rows, layout.window_blocks, group_blocks, rng)
    return RankEpoch(rows[mine], weights[mine], batch_size, n)
