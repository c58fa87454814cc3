"""The Parquet ingest benchmark runs end to end on a tiny file and reports both sides."""

from m2m_bench.ingest_parquet import format_table, headline, run


def test_ingest_parquet_bench_runs_small():
    res = run(rows=300, dim=64)
    assert res["rows"] == 300 and res["ours_seconds"] > 0 and res["baseline_seconds"] > 0
    assert res["ours_peak_rss"] > 10 << 20 and res["baseline_peak_rss"] > 10 << 20   # real processes measured
    assert "m2m ingest (ours" in format_table(res)
    rows = headline(res)
    assert rows[0]["ours"] == 300 / res["ours_seconds"] and rows[1]["baseline"] == res["baseline_peak_rss"] / (1 << 20)


def test_ingest_parquet_bench_memory_only_with_row_groups():
    res = run(rows=300, dim=64, row_groups=3, baseline=False, ingest_args=("--shard-size", "1MiB"))
    assert res["row_groups"] == 3 and "baseline_seconds" not in res and res["all_runs"]["baseline"] == []
    # >=: ru_maxrss survives exec, so no child reports less than this (pytest) process held at the fork
    assert res["ours_peak_rss"] >= res["idle_peak_rss"] > 10 << 20 and res["ours_peak_arrow"] > 0
    table = format_table(res)
    assert "3 row groups" in table and "--shard-size 1MiB" in table and "baseline" not in table.split("\n")[2]
