"""m2m vs its peers side by side (see m2m_bench.peers for the phases and what each checks).

    python benchmarks/bench_peers.py --python /path/to/peers-venv/bin/python [--rows 400000 --dim 640
        --dtype float32] [--systems numpy,m2m,litdata,mosaic,lance,webdataset] [--out results.json]

The peers live in their own virtual environment (benchmarks/README.md says how to make it); m2m and
this package are put on its path from the checkout. Cache state: each system reads files its own
writer has just written, so they are mostly in the page cache, but this VM reclaims page cache in
the background; the figures are first-pass reads in that state, for every system alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from m2m_bench.peers import SYSTEMS, make_data, phase_cell  # noqa: E402

PHASES = ("write", "epoch", "epochs3", "resume")


def _run(python: str, args: list[str], env: dict[str, str], timeout: float) -> subprocess.Popen[str]:
    return subprocess.Popen([python, "-m", "m2m_bench.peers", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"exit {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else 'no output'}"}
    return json.loads(lines[-1])


def bench(python: str, rows: int, dim: int, dtype: str, systems: list[str], work: Path,
          timeout: float, partial: Path | None = None) -> dict[str, Any]:
    """Every phase of every system; with ``partial``, the results so far are written there after each
    phase (a run cut short keeps what it measured)."""
    data = work / "data"
    make_data(data, rows, dim, dtype)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")]),
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    res: dict[str, Any] = {"rows": rows, "dim": dim, "dtype": dtype, "batch": 256, "systems": {},
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "load_before": os.getloadavg()}
    for system in systems:
        out = work / system
        r: dict[str, Any] = {}
        for phase in PHASES:
            t0 = time.perf_counter()
            r[phase] = _result(_run(python, [system, phase, str(data), str(out)], env, timeout), timeout)
            r[phase]["process_s"] = time.perf_counter() - t0
            res["systems"][system] = r
            if partial is not None:
                partial.write_text(json.dumps(res, indent=1))
            if phase == "write" and "error" in r[phase]:
                break
        if "error" not in r.get("write", {}):
            procs = [_run(python, [system, f"rank{k}", str(data), str(out), str(work / f"{system}-rank{k}.npy")],
                          env, timeout) for k in (0, 1)]
            ranks = [_result(p, timeout) for p in procs]
            if all("rows" in x for x in ranks):
                import numpy as np

                union = np.concatenate([np.load(work / f"{system}-rank{k}.npy") for k in (0, 1)])
                exact = len(union) == rows and np.array_equal(np.sort(union), np.arange(rows))
                r["ranks2"] = {"rows_per_s": sum(x["rows"] for x in ranks) / max(x["seconds"] for x in ranks),
                               "exact": bool(exact), "rows": [x["rows"] for x in ranks]}
            else:
                r["ranks2"] = next(x for x in ranks if "rows" not in x)
        res["systems"][system] = r
        if partial is not None:
            partial.write_text(json.dumps(res, indent=1))
        shutil.rmtree(out, ignore_errors=True)
    res["load_after"] = os.getloadavg()
    return res


def format_table(res: dict[str, Any]) -> str:
    lines = [f"peers: {res['rows']:,} x {res['dim']} {res['dtype']} + int64 label, batch {res['batch']}, shuffled, "
             f"0 workers, local disk ({res['date']}; load {res['load_before'][0]:.1f} before, "
             f"{res['load_after'][0]:.1f} after)"]
    cells = [("system", "write s", "1 epoch rows/s", "3 epochs rows/s", "resume: 1st batch s", "resume exact",
              "2 ranks rows/s", "2 ranks exact", "epoch vs m2m")]
    m2m = res["systems"].get("m2m", {}).get("epoch", {}).get("rows_per_s")
    for name, r in res["systems"].items():
        ep = r.get("epoch", {}).get("rows_per_s")
        cells.append((name, phase_cell(r.get("write"), "seconds", ".1f"), phase_cell(r.get("epoch"), "rows_per_s", ",.0f"),
                      phase_cell(r.get("epochs3"), "rows_per_s", ",.0f"),
                      phase_cell(r.get("resume"), "resume_first_batch_s", ".3f"), phase_cell(r.get("resume"), "exact", ""),
                      phase_cell(r.get("ranks2"), "rows_per_s", ",.0f"), phase_cell(r.get("ranks2"), "exact", ""),
                      f"{ep / m2m:.3f}x" if ep and m2m else "-"))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    table = ["  ".join([c[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(c[1:], widths[1:])]) for c in cells]
    table.insert(1, "-" * len(table[0]))
    lines += table
    errors = [f"{n} {p}: {d['error'] if 'error' in d else d['unsupported']}" for n, r in res["systems"].items()
              for p, d in r.items() if isinstance(d, dict) and ("error" in d or "unsupported" in d)]
    lines += [f"note: {e}" for e in errors]
    lines.append("lance: LanceDataset reads in storage order (no row shuffle in its torch dataset); webdataset: "
                 "shard shuffle + a 1,000-row buffer; exact = every row once (per epoch / over the 2 ranks)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the peers' virtual environment's python")
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per phase")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", default=None, help="also write the JSON results here")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="m2m-peers-"))
    try:
        res = bench(args.python, args.rows, args.dim, args.dtype, args.systems.split(","), work, args.timeout,
                    Path(args.out) if args.out else None)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    table = format_table(res)
    if args.out:
        res["table"] = table
        Path(args.out).write_text(json.dumps(res, indent=1))
        Path(args.out).with_suffix(".txt").write_text(table + "\n")
    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
