"""The 1 GB stream-vs-numpy-memmap benchmark runs end to end at a small size (no speed asserted)."""

from __future__ import annotations

import pytest
from m2m_bench import stream_memmap


@pytest.mark.slow
def test_the_benchmark_measures_every_side_and_formats_its_table(tmp_path):
    res = stream_memmap.run(rows=3000, rounds=2, steady_epochs=1, directory=tmp_path)
    runs = res["rows_per_s"]
    assert set(runs) == {"numpy", "ours", "ram_gather", "ours_first", "ours_first_nocheck", "ours_ooc",
                         "ours_ooc_nocheck"}
    assert all(len(v) == 2 and min(v) > 0 for v in runs.values())
    assert res["stats"]["steady"]["warm_mode"] == "arena" and res["stats"]["ooc"]["shuffle"] == "block"
    assert res["stats"]["ooc"]["bytes_cold"] > 0  # the small-budget loader re-read the shards
    table = stream_memmap.format_table(res)
    assert "numpy memmap" in stream_memmap.headline(res)[0]["baseline_name"] and "vs_numpy" in table
    assert list(tmp_path.iterdir()) == []  # its data is removed
