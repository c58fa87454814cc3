"""The README's benchmark table, generated from saved results (`benchmarks/results/*.json`).

    python -m m2m_bench.readme_table            # print the table
    python -m m2m_bench.readme_table --write    # rewrite it in README.md (between the markers)
    python -m m2m_bench.readme_table --check    # exit 1 when README.md is stale

Every row names the saved file it comes from; a figure that has no saved result is not in this
table. ``tests/bench/test_readme_table.py`` fails when the README's copy differs from what the files
say, so the README never carries a number the results do not hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from m2m_bench.peers import phase_cell

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
PEERS_START, PEERS_END = "<!-- peers-table:start -->", "<!-- peers-table:end -->"

Row = dict[str, Any]  # measure, ours, baseline, baseline_name, limit, limit_name (the `m2m bench` schema)


@dataclass(frozen=True)
class Source:
    """Rows from one saved result: ``pick(json) -> rows``; ``when`` says the date and cache state."""

    file: str
    when: str
    pick: Callable[[dict[str, Any]], list[Row]]


def _suite(*measures: str) -> Callable[[dict[str, Any]], list[Row]]:
    """Rows of a saved `m2m bench` run (its ``summary``), by measure name."""
    def pick(res: dict[str, Any]) -> list[Row]:
        by_name = {r["measure"]: r for r in res["summary"]}
        return [by_name[m] for m in measures]
    return pick


def _first_epoch(*keys: str) -> Callable[[dict[str, Any]], list[Row]]:
    """Rows of a saved `bench_first_epoch.py` run (medians over its interleaved rounds)."""
    def pick(res: dict[str, Any]) -> list[Row]:
        from m2m_bench import first_epoch

        rows = {k: r for k, r in zip(first_epoch.GOALS, first_epoch.headline(res))}
        return [dict(rows[k], measure=f"{first_epoch.ROW_NAMES[k]}, {res['rows']:,} x {res['dim']}, rows/s")
                for k in keys]
    return pick


def _quick_start(res: dict[str, Any]) -> list[Row]:
    row = _suite("quick start: first batch (s)")(res)[0]
    return [dict(row, measure="seed quick start: seconds to the first batch (lower is better; goal <= 20)",
                 inverse=True)]


def _parquet(res: dict[str, Any]) -> list[Row]:
    return [{"measure": "ingest 1.03 GB Parquet, seconds (lower is better)", "ours": res["ours_seconds"],
             "baseline": res["baseline_seconds"], "baseline_name": "read_table + np.save", "limit": None,
             "inverse": True},
            {"measure": "same, peak RSS MiB (lower is better)", "ours": res["ours_peak_rss"] / 2**20,
             "baseline": res["baseline_peak_rss"] / 2**20, "baseline_name": "read_table + np.save", "limit": None,
             "inverse": True}]


def _demo_stream(res: dict[str, Any]) -> list[Row]:
    s = res["demo"]["stream"]
    return [{"measure": "generative (SOC + Langevin) stream, demo lake, rows/s (the seed published 34,993)",
             "ours": s["span"]["rows_per_s"],
             "baseline": s["full"]["rows_per_s"], "baseline_name": "full-d kernel",
             "limit": s["plain_rows_per_s"], "limit_name": "plain stream"}]


def _ray(res: dict[str, Any]) -> list[Row]:
    r, n = res["results"], res["rows"]
    return [{"measure": f"estimate_kappa engine='ray', {n:,} × {res['dim']}, 2 fresh local workers (rows/s; "
                        "goal >= 0.67× local)",
             "ours": n / r["ray (fresh workers)"]["seconds"], "baseline": n / r["local"]["seconds"],
             "baseline_name": "local engine", "limit": None}]


def _transport(res: dict[str, Any]) -> list[Row]:
    b = res["best"]
    return [{"measure": f"worker -> consumer items ({res['rows']:,} x {res['dim']} f32 + 4 columns, "
                        f"{res['item_mib']:.2f} MiB), 2 DataLoader workers, items/s",
             "ours": b["ours w=2"], "baseline": b["torch w=2"], "baseline_name": "torch's shared tensors",
             "limit": b["limit"], "limit_name": "memcpy in one process"}]


SOURCES = (
    Source("first-epoch-stop32-2026-12-06.json", "12-06 eve, quiet",
           _first_epoch("first_hot", "first_cold", "steady", "f16", "f16_stored", "ooc", "ooc_cold")),
    Source("bench-suite-2026-11-26.json", "11-26, warm RAM",
           _suite("shuffled stream f32 (rows/s)", "kNN graph k=16, recall 0.961 (rows/s)")),
    Source("ingest-parquet-2026-12-02.json", "12-02, loaded", _parquet),
    Source("augment-stop31-2026-12-06.json", "12-06 pm, quiet", _demo_stream),
    Source("bench-suite-quick-2026-12-06.json", "12-06, quiet, `m2m bench --quick`", _quick_start),
    Source("ray-kappa-2026-12-06-1m.json", "12-06, quiet", _ray),
    Source("transport-2026-12-07.json", "12-07, quiet, item in L3", _transport),
)


def _num(v: float) -> str:
    return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"


def _ratio(v: float) -> str:
    return f"{v:,.0f}×" if v >= 100 else f"{v:.2f}×" if v >= 0.1 else f"{v:.2g}×"


def rows() -> list[Row]:
    """Every row of the table with its source file and date."""
    out = []
    for src in SOURCES:
        res = json.loads((RESULTS / src.file).read_text())
        for r in src.pick(res):
            out.append({**r, "file": src.file, "when": src.when})
    return out


def markdown() -> str:
    lines = ["| measure (date, state) | ours | what a user would write | physical limit | ours / user | ours / limit |"
             " saved in |", "|---|---|---|---|---|---|---|"]
    for r in rows():
        base, lim, inv = r.get("baseline"), r.get("limit"), r.get("inverse", False)
        vs_base = "–" if not base else _ratio(base / r["ours"] if inv else r["ours"] / base)
        vs_lim = "–" if not lim else _ratio(r["ours"] / lim)
        lines.append(
            f"| {r['measure']} ({r['when']}) | {_num(r['ours'])} | "
            + (f"{_num(base)} {r.get('baseline_name', '')}".strip() if base else "–") + " | "
            + (f"{_num(lim)} {r.get('limit_name', '')}".strip() if lim else "–") + f" | {vs_base} | {vs_lim} | "
            f"`{r['file']}` |")
    lines.append("")
    lines.append("Ratios here are of the figures shown (medians, for the interleaved runs; the saved tables also give "
                 "the median and range of the per-round ratios). ours / user for the lower-is-better rows is the "
                 "baseline's figure over ours.")
    return "\n".join(lines)


def peers_markdown(file: str = "peers-1m-x384-f16-2026-12-06.json") -> str:
    """The saved peers run (`bench_peers.py`) as a table: one shuffled epoch, three epochs, a resume, 2 ranks."""
    res = json.loads((RESULTS / file).read_text())
    m2m = res["systems"].get("m2m", {}).get("epoch", {}).get("rows_per_s")

    def cell(d: dict[str, Any] | None, key: str, fmt: str) -> str:
        return phase_cell(d, key, fmt, missing="–")

    lines = [f"`{file}`: {res['rows']:,} × {res['dim']} {res['dtype']} + int64 label, batch {res['batch']}, "
             f"shuffled, 0 workers ({res['date']}; load {res['load_before'][0]:.1f} before, "
             f"{res['load_after'][0]:.1f} after)", "",
             "| system | write s | 1 epoch rows/s | 3 epochs rows/s | resume: 1st batch s | 2 ranks rows/s "
             "| 2 ranks exact | 1 epoch vs m2m |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["systems"].items():
        ep = r.get("epoch", {}).get("rows_per_s")
        lines.append(f"| {name} | {cell(r.get('write'), 'seconds', '.1f')} | {cell(r.get('epoch'), 'rows_per_s', ',.0f')}"
                     f" | {cell(r.get('epochs3'), 'rows_per_s', ',.0f')} | "
                     f"{cell(r.get('resume'), 'resume_first_batch_s', '.3f')} | "
                     f"{cell(r.get('ranks2'), 'rows_per_s', ',.0f')} | {cell(r.get('ranks2'), 'exact', '')} | "
                     + (f"{ep / m2m:.2f}×" if ep and m2m else "–") + " |")
    return "\n".join(lines)


def _between(text: str, start: str, end: str, body: str) -> str:
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a] + "\n" + body + "\n" + text[b:]


def updated(text: str) -> str:
    """``text`` (the README) with both generated blocks replaced by what the saved results say."""
    return _between(_between(text, START, END, markdown()), PEERS_START, PEERS_END, peers_markdown())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="rewrite the tables in README.md")
    group.add_argument("--check", action="store_true", help="exit 1 when README.md's tables are stale")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = updated(text)
    if args.write:
        README.write_text(new)
    elif args.check:
        if new != text:
            sys.stderr.write("README.md's benchmark tables differ from benchmarks/results: run "
                             "python -m m2m_bench.readme_table --write\n")
            return 1
    else:
        sys.stdout.write(markdown() + "\n\n" + peers_markdown() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
