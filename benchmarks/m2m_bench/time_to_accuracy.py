"""Time to accuracy: how many rows (and seconds) each sampling or augmentation mode streams before the
model reaches 99% of uniform training's final test accuracy.

"Train faster" means reaching the same accuracy with less data or time, so this is the measure of every
mode. The runs are those of `m2m_bench.downstream` (a linear head and a 2-layer MLP trained through the
lake's stream, scored on held-out rows) with the model scored several times per epoch. For each
(dataset, model, seed) the target is ``fraction`` x the final accuracy of uniform streaming with that
model and seed; a mode's cost is the first scored point at or above it: rows streamed and training
seconds (the stream and the optimiser; evaluation excluded). The speed-up is uniform's rows (seconds)
over the mode's, per seed, then mean ± sd over seeds; a mode that never reaches the target within the
run has no speed-up for that seed and the table says how many seeds reached it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from m2m_bench.downstream import run, to_target

FRACTION = 0.99


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(res: dict[str, Any], fraction: float = FRACTION) -> list[dict[str, Any]]:
    """Per (dataset, model, method): seeds that reached the target, rows/seconds to it, speed-ups."""
    runs = res["runs"]
    uniform = {(r["dataset"], r["model"], r["seed"]): r for r in runs if r["method"] == "uniform"}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"], r["method"]), []).append(r)
    out = []
    for (ds, kind, method), rs in groups.items():
        rows, secs, row_x, sec_x = [], [], [], []
        for r in rs:
            base = uniform.get((ds, kind, r["seed"]))
            if base is None:
                continue
            target = fraction * base["accuracy"]
            mine, theirs = to_target(r["curve"], target), to_target(base["curve"], target)
            if mine is None or theirs is None:
                continue
            rows.append(mine[0])
            secs.append(mine[1])
            row_x.append(theirs[0] / mine[0])
            sec_x.append(theirs[1] / mine[1] if mine[1] > 0 else float("nan"))
        entry: dict[str, Any] = {"dataset": ds, "model": kind, "method": method, "seeds": len(rs),
                                 "reached": len(rows), "final_accuracy": _mean_sd([r["accuracy"] for r in rs])}
        if rows:
            entry.update(rows_to_target=_mean_sd(rows), seconds_to_target=_mean_sd(secs),
                         speedup_rows=_mean_sd(row_x), speedup_seconds=_mean_sd(sec_x))
        out.append(entry)
    return out


def measure(quick: bool = False, datasets: Sequence[str] = ("digits", "text"), seeds: Sequence[int] | None = None,
            epochs: int | None = None, methods: Sequence[str] | None = None, models: Sequence[str] = ("linear",),
            evals_per_epoch: int = 4, fraction: float = FRACTION,
            on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train every (dataset, model, method, seed), scoring ``evals_per_epoch`` times per epoch;
    ``on_progress(res)`` gets the results so far (with their summary) after each (dataset, seed)."""

    def progress(res: dict[str, Any]) -> None:
        if on_progress is not None:
            on_progress({**res, "fraction": fraction, "time_to_accuracy": summarize(res, fraction)})

    res = run(quick=quick, datasets=datasets, seeds=seeds, epochs=epochs, methods=methods, models=models,
              evals_per_epoch=evals_per_epoch, on_progress=progress)
    res["fraction"] = fraction
    res["time_to_accuracy"] = summarize(res, fraction)
    return res


def format_table(res: dict[str, Any]) -> str:
    """method | final accuracy | seeds reaching the target | rows and seconds to it | speed-ups vs uniform."""
    frac = res["fraction"]
    lines = [f"time to accuracy: rows streamed (and training seconds) until test accuracy >= {frac:.0%} of uniform's "
             f"final accuracy; {res['epochs']} epochs, scored {res['evals_per_epoch']}x per epoch, seeds "
             f"{res['seeds']} (mean ± sd)"]
    cells = [("dataset/model", "method", "final acc %", "reached", "rows to target", "s to target",
              "speed-up (rows)", "speed-up (s)")]

    def ms(v: tuple[float, float] | None, fmt: str) -> str:
        return "-" if v is None else f"{v[0]:{fmt}} ± {v[1]:{fmt}}"

    for e in res["time_to_accuracy"]:
        acc = e["final_accuracy"]
        cells.append((f"{e['dataset']}/{e['model']}", e["method"], f"{100 * acc[0]:.2f} ± {100 * acc[1]:.2f}",
                      f"{e['reached']}/{e['seeds']}", ms(e.get("rows_to_target"), ",.0f"),
                      ms(e.get("seconds_to_target"), ".2f"), ms(e.get("speedup_rows"), ".2f"),
                      ms(e.get("speedup_seconds"), ".2f")))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    table = ["  ".join([c[0].ljust(widths[0]), c[1].ljust(widths[1])] + [v.rjust(w) for v, w in zip(c[2:], widths[2:])])
             for c in cells]
    table.insert(1, "-" * len(table[0]))
    lines += table
    lines.append("speed-up = uniform's rows (s) to the target / the mode's, per seed; below 1 = slower than uniform; "
                 "seconds were measured on a shared machine (rows do not depend on load)")
    for note in res["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
