"""Downstream benchmark: does the lake's SOC and augmentation help a model trained through it?

On real data that builds offline — the seeded digits protocol (``m2m_bench.datasets.digits_embeddings``,
split by source image) and, when its optional packages are installed, VADER lexicon entries
embedded by all-MiniLM-L6-v2 (``m2m_bench.datasets.word_sentiment_embeddings``) — a linear head and a
2-layer MLP are trained *through the lake's stream* with each method below, for the same number of
epochs, and scored on held-out rows. Every (dataset, seed) gets its own lake; kappa is estimated
once per lake, consolidation works on a second lake of the same rows.

Methods: uniform (plain shuffled epochs); importance sampling by kappa and by loss (with
``update_priorities`` each step); consolidation to about half the rows (threshold found with
``lake.criticality``), streamed uniformly and with alpha-importance, the latter also for twice the
epochs (about as many rows streamed as uniform on the full lake); Langevin and vMF augmentation.
Weighted runs use ``sum(w * loss) / sum(w)``. Reported: test accuracy (mean ± std over seeds) and
wall-clock seconds per run (stream + training, evaluation excluded).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

COLUMNS = ("embedding", "label", "id", "weight")
MODELS = ("linear", "mlp")
TARGET_KEEP = 0.5


@dataclass(frozen=True)
class Method:
    """One way of streaming the lake into the model."""

    name: str
    importance: str | bool = False
    generate: str | bool = False
    consolidated: bool = False
    epoch_scale: int = 1   # epochs = epoch_scale x the benchmark's epochs (equal rows on a half-size lake)


METHODS = (
    Method("uniform"),
    Method("importance: kappa", importance="kappa"),
    Method("importance: loss", importance="loss"),
    Method("consolidated ~50%", consolidated=True),
    Method("consolidated ~50% + alpha IS", importance="alpha", consolidated=True),
    Method("consolidated ~50% + alpha, 2x ep", importance="alpha", consolidated=True, epoch_scale=2),
    Method("langevin augmentation", generate="langevin"),
    Method("vmf augmentation", generate="vmf"),
    Method("mixture augmentation", generate="mixture"),
)


class Split(NamedTuple):
    """Labelled unit rows for training (through a lake) and testing (held out)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


# ---------------------------------------------------------------------------------------------- training
def make_model(kind: str, dim: int, classes: int, seed: int, hidden: int = 256) -> nn.Module:
    """A linear head or a 2-layer MLP, initialised from ``seed``."""
    gen_state = torch.random.fork_rng(devices=[])
    with gen_state:
        torch.manual_seed(seed)
        if kind == "linear":
            return nn.Linear(dim, classes)
        if kind == "mlp":
            return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    raise ValueError(f"model kind must be one of {MODELS}, got {kind!r}")


def learning_rate(kind: str) -> float:
    """Adam step size used for each model kind."""
    return 1e-2 if kind == "linear" else 2e-3


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    pred = model(x).argmax(dim=1)
    model.train()
    return float((pred == y).float().mean())


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, dl: Any, weighted: bool, feedback: bool,
                every: int = 0, on_batches: Callable[[int], None] | None = None) -> int:
    """One epoch of ``dl`` (batches with COLUMNS); returns the rows consumed.

    ``weighted``: loss = sum(w * l) / sum(w) with the batch's importance weights.
    ``feedback``: per-row losses go back to the sampler with ``dl.update_priorities``.
    ``on_batches(rows)`` is called after every ``every`` batches (0: never) with the rows so far.
    """
    rows = 0
    for i, batch in enumerate(dl, 1):
        logits = model(batch["embedding"])
        per_row = nn.functional.cross_entropy(logits, batch["label"], reduction="none")
        if weighted:
            w = batch["weight"]
            loss = (w * per_row).sum() / w.sum()
        else:
            loss = per_row.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if feedback:
            dl.update_priorities(batch["id"], per_row.detach())
        rows += int(per_row.shape[0])
        if every and on_batches is not None and i % every == 0:
            on_batches(rows)
    return rows


def fit_through_lake(lake: Any, model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, *, epochs: int,
                     lr: float, importance: str | bool = False, generate: str | bool = False,
                     batch_size: int = 256, seed: int = 0, evals_per_epoch: int = 1,
                     on_epoch: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train ``model`` on the lake's stream for ``epochs``; test accuracy after each epoch.

    Returns ``accuracy`` (per epoch), ``seconds`` (stream construction + training, evaluation
    excluded), ``rows`` (rows streamed), ``rows_per_epoch`` and ``curve``: ``(rows streamed, training
    seconds, test accuracy)`` at about ``evals_per_epoch`` evenly spaced points of every epoch
    (always at its end), for time-to-accuracy.
    """
    t0 = time.perf_counter()
    dl = lake.export_to_dataloader(batch_size=batch_size, shuffle=True, importance_sampling=importance,
                                   generate_samples=generate, columns=COLUMNS, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    clock = {"seconds": time.perf_counter() - t0, "since": 0.0, "rows": 0}
    every = max(1, len(dl) // evals_per_epoch) if evals_per_epoch > 1 else 0
    curve: list[tuple[int, float, float]] = []

    def evaluate(rows_in_epoch: int) -> None:
        now = time.perf_counter()
        clock["seconds"] += now - clock["since"]
        curve.append((clock["rows"] + rows_in_epoch, clock["seconds"], accuracy(model, test_x, test_y)))
        clock["since"] = time.perf_counter()   # evaluation is not training time

    accs: list[float] = []
    rows: list[int] = []
    for e in range(epochs):
        clock["since"] = time.perf_counter()
        dl.set_epoch(e)
        n = train_epoch(model, opt, dl, weighted=bool(importance), feedback=importance == "loss",
                        every=every, on_batches=evaluate)
        if not curve or curve[-1][0] != clock["rows"] + n:
            evaluate(n)
        clock["rows"] += n
        rows.append(n)
        accs.append(curve[-1][2])
        if on_epoch is not None:
            on_epoch(e, accs[-1])
    return {"accuracy": accs, "seconds": clock["seconds"], "rows": sum(rows), "rows_per_epoch": rows,
            "curve": curve}


def to_target(curve: Sequence[Sequence[float]], target: float) -> tuple[int, float] | None:
    """``(rows, seconds)`` at the first point of ``curve`` whose accuracy reaches ``target``; None if none."""
    for rows, seconds, acc in curve:
        if acc >= target:
            return int(rows), float(seconds)
    return None


# ---------------------------------------------------------------------------------------------- lakes
def threshold_for_keep(lake: Any, keep: float = TARGET_KEEP, lo: float = 0.5, hi: float = 0.9999,
                       iters: int = 10) -> float:
    """The cosine threshold at which ``lake.criticality`` estimates that ``keep`` of the rows remain."""
    for _ in range(iters):  # redundancy falls as the threshold rises
        mid = 0.5 * (lo + hi)
        if lake.criticality(similarity=mid)["redundancy"] > 1.0 - keep:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _new_lake(split: Split, seed: int) -> Any:
    from m2m import M2MConfig, create_m2m

    lake = create_m2m(M2MConfig(latent_dim=int(split.train_x.shape[1]), seed=seed))
    lake.add_splats(split.train_x, labels=split.train_y)
    return lake


def consolidated_lake(split: Split, seed: int, keep: float = TARGET_KEEP, tol: float = 0.03, step: float = 0.005,
                      tries: int = 6) -> tuple[Any, dict[str, Any]]:
    """A lake of the training rows consolidated to about ``keep`` of them.

    The first threshold comes from ``lake.criticality`` (``threshold_for_keep``); the achieved share
    is then corrected by real consolidations of fresh lakes (steps of ``step``, then bisection) until
    it is within ``tol`` of ``keep`` or ``tries`` ran out. Returns the closest lake and what was tried.
    """
    probe = _new_lake(split, seed)
    try:
        sim = threshold_for_keep(probe, keep)
    finally:
        probe.close()
    lo, hi = None, None  # thresholds known to keep too few / too many rows
    best: tuple[float, Any, dict[str, Any]] | None = None
    tried = []
    for _ in range(tries):
        lake = _new_lake(split, seed)
        report = lake.consolidate(similarity=sim)
        share = report.rows_after / report.rows_before
        tried.append({"similarity": sim, "keep": share})
        info = {"similarity": sim, "rows_before": int(report.rows_before), "rows_after": int(report.rows_after),
                "criticality_threshold": tried[0]["similarity"], "tried": tried}
        if best is None or abs(share - keep) < best[0]:
            if best is not None:
                best[1].close()
            best = (abs(share - keep), lake, info)
        else:
            lake.close()
        if abs(share - keep) <= tol:
            break
        if share < keep:   # merged too much: raise the threshold
            lo = sim
            sim = 0.5 * (sim + hi) if hi is not None else min(sim + step, 0.99999)
        else:
            hi = sim
            sim = 0.5 * (sim + lo) if lo is not None else sim - step
    assert best is not None
    return best[1], best[2]


def build_lake(split: Split, seed: int, consolidate: bool) -> tuple[Any, dict[str, Any]]:
    """A temporary lake of the training rows with kappa estimated (consolidated to ~50% if asked)."""
    t0 = time.perf_counter()
    if consolidate:
        lake, info = consolidated_lake(split, seed)
    else:
        lake, info = _new_lake(split, seed), {}
        lake.estimate_kappa()
    info["prepare_seconds"] = time.perf_counter() - t0
    return lake, info


# ---------------------------------------------------------------------------------------------- datasets
def load_split(name: str, seed: int, quick: bool) -> Split:
    """The named dataset's split for ``seed`` (text raises ImportError without its packages)."""
    from m2m_bench.datasets import digits_embeddings, word_sentiment_embeddings

    if name == "digits":
        d = digits_embeddings(rows=4_000 if quick else 10_000, dim=640, seed=seed)
    elif name == "text":
        d = word_sentiment_embeddings(seed=seed)  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from ('digits', 'text')")
    return Split(d.train_x, d.train_y, d.test_x, d.test_y)


def run(quick: bool = False, datasets: Sequence[str] = ("digits", "text"), seeds: Sequence[int] | None = None,
        epochs: int | None = None, methods: Sequence[str] | None = None,
        models: Sequence[str] = MODELS, evals_per_epoch: int = 1,
        on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train every (dataset, model, method, seed); returns per-run records and a mean ± std summary.

    ``evals_per_epoch`` > 1 scores the model that often per epoch (the curve of `time_to_accuracy`).

    A dataset whose optional packages are missing is skipped with a note in ``notes``.
    """
    torch.set_num_threads(1)
    seeds = list(seeds if seeds is not None else ((0,) if quick else (0, 1, 2)))
    epochs = epochs or (3 if quick else 10)
    chosen = [m for m in METHODS if methods is None or m.name in methods]
    if methods is not None and len(chosen) != len(methods):
        raise ValueError(f"unknown method in {list(methods)}; choose from {[m.name for m in METHODS]}")
    res: dict[str, Any] = {"quick": quick, "epochs": epochs, "seeds": seeds, "batch_size": 256,
                           "methods": [asdict(m) for m in chosen], "models": list(models), "runs": [],
                           "lakes": [], "notes": [], "datasets": {}, "evals_per_epoch": evals_per_epoch}
    for ds in datasets:
        for seed in seeds:
            try:
                split = load_split(ds, seed, quick)
            except ImportError as exc:
                res["notes"].append(f"{ds}: skipped ({exc})")
                break
            res["datasets"].setdefault(ds, {"train_rows": int(len(split.train_y)), "test_rows": int(len(split.test_y)),
                                            "dim": int(split.train_x.shape[1]), "classes": int(split.train_y.max() + 1),
                                            "seed": seed})
            _run_dataset(res, ds, seed, split, chosen, models, epochs, evals_per_epoch)
            if on_progress is not None:  # partial results survive a run cut short
                on_progress(res)
    res["summary"] = summarize(res["runs"])
    return res


def _run_dataset(res: dict[str, Any], ds: str, seed: int, split: Split, methods: Sequence[Method],
                 models: Sequence[str], epochs: int, evals_per_epoch: int = 1) -> None:
    test_x = torch.from_numpy(np.ascontiguousarray(split.test_x, dtype=np.float32))
    test_y = torch.from_numpy(split.test_y.astype(np.int64))
    classes = int(max(split.train_y.max(), split.test_y.max()) + 1)
    lakes: dict[bool, Any] = {}
    try:
        for method in methods:
            if method.consolidated not in lakes:
                lakes[method.consolidated], info = build_lake(split, seed, method.consolidated)
                res["lakes"].append({"dataset": ds, "seed": seed, "consolidated": method.consolidated, **info})
            lake = lakes[method.consolidated]
            if not res["runs"]:  # the process's first run: pay one-time costs (allocator, kernels) untimed
                fit_through_lake(lake, make_model(models[0], int(split.train_x.shape[1]), classes, seed), test_x,
                                 test_y, epochs=1, lr=learning_rate(models[0]), seed=seed)
            for kind in models:
                model = make_model(kind, int(split.train_x.shape[1]), classes, seed)
                out = fit_through_lake(lake, model, test_x, test_y, epochs=epochs * method.epoch_scale,
                                       lr=learning_rate(kind),
                                       importance=method.importance, generate=method.generate, seed=seed,
                                       evals_per_epoch=evals_per_epoch)
                res["runs"].append({"dataset": ds, "model": kind, "method": method.name, "seed": seed,
                                    "accuracy": out["accuracy"][-1], "accuracy_per_epoch": out["accuracy"],
                                    "seconds": out["seconds"], "rows_streamed": out["rows"],
                                    "lake_rows": len(lake), "curve": out["curve"]})
                log.info("%s %s %s seed %d: acc %.4f in %.2f s", ds, kind, method.name, seed,
                         out["accuracy"][-1], out["seconds"])
    finally:
        for lake in lakes.values():
            lake.close()


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) std of accuracy and seconds per (dataset, model, method), in run order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"], r["method"]), []).append(r)
    out = []
    for (ds, kind, method), rs in groups.items():
        acc = np.array([r["accuracy"] for r in rs])
        sec = np.array([r["seconds"] for r in rs])
        out.append({"dataset": ds, "model": kind, "method": method, "n": len(rs),
                    "acc_mean": float(acc.mean()), "acc_std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
                    "sec_mean": float(sec.mean()), "lake_rows": int(np.mean([r["lake_rows"] for r in rs])),
                    "rows_streamed": int(np.mean([r["rows_streamed"] for r in rs]))})
    return out


def format_table(res: dict[str, Any]) -> str:
    """One table per dataset: method | per model: accuracy mean ± std, delta vs uniform, s/run."""
    lines = [f"downstream: test accuracy through the lake, {res['epochs']} epochs, batch {res['batch_size']}, "
             f"seeds {res['seeds']} (mean ± std), wall-clock s/run = stream + training"]
    summary = res["summary"]
    for ds, meta in res["datasets"].items():
        lines.append("")
        lines.append(f"{ds}: {meta['train_rows']:,} train / {meta['test_rows']:,} test rows (seed {meta['seed']}) "
                     f"x {meta['dim']}, {meta['classes']} classes")
        head = f"{'method':<34}{'lake rows':>10}{'rows/run':>10}"
        for kind in res["models"]:
            head += f"{kind + ' acc':>18}{'vs unif':>9}{'s/run':>8}"
        lines.append(head)
        lines.append("-" * len(head))
        by = {(s["model"], s["method"]): s for s in summary if s["dataset"] == ds}
        for m in res["methods"]:
            row = [by.get((k, m["name"])) for k in res["models"]]
            if not any(row):
                continue
            first = next(s for s in row if s)
            line = f"{m['name']:<34}{first['lake_rows']:>10,}{first['rows_streamed']:>10,}"
            for kind, s in zip(res["models"], row):
                if s is None:
                    line += f"{'-':>18}{'-':>9}{'-':>8}"
                    continue
                base = by.get((kind, "uniform"))
                delta = f"{100 * (s['acc_mean'] - base['acc_mean']):+.2f}" if base else "-"
                line += f"{100 * s['acc_mean']:>11.2f} ± {100 * s['acc_std']:<4.2f}{delta:>9}{s['sec_mean']:>8.2f}"
            lines.append(line)
        cons = [lk for lk in res["lakes"] if lk["dataset"] == ds and lk["consolidated"]]
        if cons:
            lines.append("consolidation: " + "; ".join(
                f"seed {c['seed']}: cos >= {c['similarity']:.4f}, {c['rows_before']:,} -> {c['rows_after']:,} rows "
                f"({c['rows_after'] / c['rows_before']:.0%}; criticality() put 50% at cos "
                f"{c['criticality_threshold']:.4f}, which kept {c['tried'][0]['keep']:.0%})" for c in cons))
    lines.append("accuracy in %, 'vs unif' in percentage points against uniform streaming of the same model")
    for note in res["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Summary rows for `m2m bench`: best method's accuracy vs uniform, per dataset and model."""
    rows = []
    for s in res["summary"]:
        if s["method"] == "uniform":
            continue
        base = next((b for b in res["summary"] if b["dataset"] == s["dataset"] and b["model"] == s["model"]
                     and b["method"] == "uniform"), None)
        if base is None or not math.isfinite(base["acc_mean"]):
            continue
        rows.append({"measure": f"{s['dataset']} {s['model']} acc: {s['method']}"[:38], "ours": s["acc_mean"],
                     "baseline": base["acc_mean"], "baseline_name": "uniform", "limit": None})
    return rows
