"""The stream benchmark of issue 20 runs end to end at a small size (no speed asserted)."""

from __future__ import annotations

from m2m_bench import first_epoch


def test_every_row_measures_ours_the_numpy_loop_and_the_limit(tmp_path):
    res = first_epoch.run(rows=3000, rounds=1, steady_epochs=1, directory=tmp_path)
    runs = res["rows_per_s"]
    assert set(runs) == {"first_hot", "first_cold", "steady", "f16", "f16_stored", "ooc", "ooc_cold"}
    assert all(len(side) == 1 and side[0] > 0 for row in runs.values() for side in row.values())
    assert res["stats"]["steady"]["warm_mode"] == "arena" and res["stats"]["ooc"]["shuffle"] == "block"
    assert res["stats"]["ooc"]["bytes_cold"] > 0  # the small-budget loader re-read the shards
    assert res["stats"]["f16_stored"]["rows"] > 0
    table = first_epoch.format_table(res)
    for name in first_epoch.ROW_NAMES.values():
        assert name in table
    assert len(first_epoch.headline(res)) == 7
    assert set(res["goals_met"]) == {k for k, (_, goal) in first_epoch.GOALS.items() if goal is not None}
    assert list(tmp_path.iterdir()) == []  # its data is removed
