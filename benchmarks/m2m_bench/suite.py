"""`m2m bench`: run the benchmark modules and print one side-by-side summary table (or JSON).

Each module under `m2m_bench` exposes ``run(quick) -> dict``, ``format_table(res) -> str`` and
``headline(res) -> list[dict]`` (measure, ours, baseline, baseline_name, limit, limit_name).
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from typing import Any, Sequence

import torch

MODULES = ("ingest", "ingest_parquet", "stream", "stream_memmap", "first_epoch", "quickstart", "langevin", "knn",
           "consolidate", "ray_engine")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v < 100:
        return f"{v:,.3g}"
    return f"{v:,.0f}"


def summary_table(rows: list[dict[str, Any]]) -> str:
    """measure | ours | what a user would write | physical limit | ours/baseline | ours/limit.

    Column widths follow the widest cell, so long baseline or limit names never shift a column."""
    cells = [("measure", "ours", "user baseline", "physical limit", "vs base", "vs limit")]
    for r in rows:
        base, lim = r.get("baseline"), r.get("limit")
        cells.append((
            r["measure"], _fmt(r["ours"]),
            f"{_fmt(base)} {r.get('baseline_name', '')}".strip() if base is not None else "-",
            f"{_fmt(lim)} {r.get('limit_name', '')}".strip() if lim is not None else "-",
            f"{r['ours'] / base:.2f}x" if base else "-",
            f"{r['ours'] / lim:.2f}x" if lim else "-",
        ))
    widths = [max(len(c[i]) for c in cells) for i in range(6)]
    lines = ["  ".join([c[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(c[1:], widths[1:])]) for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run_suite(quick: bool = False, as_json: bool = False, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected benchmark modules in this process, print the tables, return all results."""
    import click

    torch.set_num_threads(1)
    names = list(only) if only else list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(MODULES)}")
    results: dict[str, Any] = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                                           "platform": platform.platform(), "cpus": torch.get_num_threads()},
                               "quick": quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "benchmarks": {}}
    rows: list[dict[str, Any]] = []
    for name in names:
        mod = importlib.import_module(f"m2m_bench.{name}")
        click.echo(f"running {name} ...", err=True)
        t0 = time.perf_counter()
        res = mod.run(quick=quick)
        res["seconds"] = time.perf_counter() - t0
        results["benchmarks"][name] = res
        rows.extend(mod.headline(res))
        if not as_json:
            click.echo(mod.format_table(res))
            click.echo("")
    results["summary"] = rows
    if as_json:
        click.echo(json.dumps(results, indent=1, default=str))
    else:
        click.echo(summary_table(rows))
    return results
