"""Every module of `m2m bench` runs end to end at a small size and gives its table and summary rows
(no speed asserted): the suite must not rot when the library's internals move."""

from __future__ import annotations

import importlib
import inspect

import pytest
from m2m_bench.suite import MODULES

SMALL = {"ingest": 2_000, "ingest_parquet": 2_000, "stream": 3_000, "stream_memmap": 3_000, "first_epoch": 3_000,
         "quickstart": 2_000, "langevin": 1_000, "knn": 3_000, "consolidate": 2_000, "ray_engine": 21_000}


# the two heaviest (30 s each on CI's 2 cores) run in the slow suite, which CI runs too
_SLOW = {"langevin", "ray_engine"}


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m in _SLOW else m for m in MODULES])
def test_every_suite_module_runs_small(name, tmp_path):
    mod = importlib.import_module(f"m2m_bench.{name}")
    kw = {"rows": SMALL[name]}
    params = inspect.signature(mod.run).parameters
    if "directory" in params:
        kw["directory"] = tmp_path
    if "rounds" in params:
        kw["rounds"] = 1
    res = mod.run(quick=True, **kw)
    assert mod.format_table(res)
    if "skipped" in res:  # an optional extra (Ray) missing: the module says so instead of failing
        pytest.skip(res["skipped"])
    rows = mod.headline(res)
    assert rows and all(r["measure"] and r["ours"] is not None for r in rows)
