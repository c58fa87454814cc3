"""The README's benchmark tables are what benchmarks/results holds (m2m_bench.readme_table)."""

from __future__ import annotations

from m2m_bench import readme_table


def test_the_readme_tables_are_generated_from_the_saved_results():
    text = readme_table.README.read_text()
    assert readme_table.updated(text) == text, \
        "README.md's benchmark tables are stale: python -m m2m_bench.readme_table --write"


def test_every_row_names_an_existing_result_file_and_a_number():
    rows = readme_table.rows()
    assert len(rows) >= 10
    for r in rows:
        assert (readme_table.RESULTS / r["file"]).is_file()
        assert r["ours"] > 0 and r["when"]
