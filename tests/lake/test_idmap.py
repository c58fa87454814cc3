"""`m2m.lake.idmap.ShardIds`: positions of ids in a shard with gaps, from a bitmap over its id range."""

from __future__ import annotations

import numpy as np
import pytest

from m2m.lake import idmap
from m2m.lake.idmap import ShardIds


@pytest.mark.parametrize("lo, span, keep", [(0, 1000, 0.9), (12_345, 100_000, 0.99), (5, 64, 0.5), (7, 1, 1.0),
                                            (100, 3000, 0.01), (2**40, 777, 0.7)])
@pytest.mark.parametrize("table_popcount", [False, True])
def test_positions_equal_a_search_of_the_id_column(monkeypatch, lo, span, keep, table_popcount):
    if table_popcount:  # numpy < 2.0 has no bitwise_count: the byte-table fallback
        monkeypatch.setattr(idmap, "_popcount", idmap._popcount_table)
    rng = np.random.default_rng(span)
    ids = np.sort(rng.choice(np.arange(lo, lo + span), max(1, int(span * keep)), replace=False))
    m = ShardIds(ids, lo, lo + span - 1)
    queries = np.concatenate([ids, rng.integers(lo - 70, lo + span + 70, 2000), [lo - 1, lo + span]])
    want = np.where(np.isin(queries, ids), np.searchsorted(ids, queries), -1)
    np.testing.assert_array_equal(m.positions(queries), want)
    wide = span > idmap.MAX_SPAN_PER_ROW * len(ids)
    assert m.nbytes <= (8 * len(ids) if wide else span // 8 + span // 16 + 16)


def test_a_shard_with_few_gaps_takes_a_fraction_of_its_id_column():
    ids = np.delete(np.arange(1_000_000), np.arange(0, 1_000_000, 97))
    m = ShardIds(ids, 0, 999_999)
    assert m.nbytes * 40 < ids.nbytes
    np.testing.assert_array_equal(m.positions(ids[::1000]), np.arange(0, len(ids), 1000))
