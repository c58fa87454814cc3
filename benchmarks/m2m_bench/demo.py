"""`m2m demo`: the main job on a real dataset, end to end, with every figure measured in this run.

sklearn's digits in the seed protocol (``m2m_bench.datasets.digits_embeddings``: rows resampled from the
1,797 images, projected 64 -> dim, split by source image) are ingested into a lake; kappa is
estimated, the lake's criticality read and near-duplicates consolidated; the stream is timed with
SOC importance sampling (standard), with Langevin augmentation (generative) and with the vMF and
mixture augmentations; what each augmentation produces (mean cosine to the source row, own-component
responsibility under the row's neighbourhood mixture) is measured on the lake; a linear classifier
is trained through a plain uniform stream of the raw lake and, with the same budget of rows streamed,
through the SOC + Langevin stream of the consolidated lake (weighted loss), scored several times per
epoch: the time to accuracy is the rows each streams until 99% of uniform's final test accuracy.
One table and one figure (``m2m-demo-report.png``: kappa, throughput, accuracy against rows streamed)
report the run beside the figures the original M2M README published (quoted constants, labelled as such).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import click
import numpy as np
import torch

from m2m.cli.progress import Bar
from m2m.errors import ConfigError

# Figures published in the original M2M README (quoted, not measured here).
ORIGINAL_README = {"ingest": 80_260, "standard": 49_368, "generative": 34_993}
REPORT_NAME = "m2m-demo-report.png"
BATCH_SIZE = 256
EVALS_PER_EPOCH = 4      # test accuracy is scored this often per epoch (the time-to-accuracy curve)
TARGET_FRACTION = 0.99   # time to accuracy: rows until this fraction of uniform training's final accuracy
INGEST_CHUNK = 1024
MIN_STREAM_SECONDS = 1.0
MAX_STREAM_EPOCHS = 20
STREAM_COLUMNS = ("embedding", "label", "id", "weight")


def _check_args(rows: int, dim: int, epochs: int, seed: int) -> None:
    for name, value, low in (("rows", rows, 100), ("dim", dim, 2), ("epochs", epochs, 1), ("seed", seed, 0)):
        if value < low:
            raise ConfigError(f"--{name} must be >= {low}, got {value}")


def _ingest(lake: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Ingest the training rows as one atomic commit with a progress bar; returns rows/s."""
    def chunks() -> Any:
        for lo in range(0, len(x), INGEST_CHUNK):
            yield {"vectors": x[lo:lo + INGEST_CHUNK], "labels": y[lo:lo + INGEST_CHUNK]}

    with Bar(len(x), "ingest") as bar:
        t0 = time.perf_counter()
        lake.add_splat_chunks(chunks, progress=bar)
        seconds = time.perf_counter() - t0
    return len(x) / seconds


def _with_bar(total: int, desc: str, fn: Any) -> tuple[Any, float]:
    with Bar(total, desc) as bar:
        t0 = time.perf_counter()
        out = fn(bar)
        return out, time.perf_counter() - t0


def _stream_rate(lake: Any, generate: str | bool, seed: int) -> float:
    """Rows/s of the SOC importance stream (``generate``: False or a generate_samples mode), no model attached."""
    dl = lake.export_to_dataloader(batch_size=BATCH_SIZE, shuffle=True, importance_sampling=True,
                                   generate_samples=generate, columns=STREAM_COLUMNS, seed=seed)
    for _ in dl:  # warm-up epoch: builds the sampler's plan, the augmenter tables, the warm tier
        pass
    rows = 0
    t0 = time.perf_counter()
    epoch = 1
    while True:
        dl.set_epoch(epoch)
        for batch in dl:
            rows += int(batch["embedding"].shape[0])
        epoch += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= MIN_STREAM_SECONDS or epoch > MAX_STREAM_EPOCHS:
            if batch["embedding"].is_cuda:
                torch.cuda.synchronize()
            return rows / (time.perf_counter() - t0)


def _law(lake: Any, seed: int, sample_rows: int = 1024) -> dict[str, Any]:
    """``m2m_bench.langevin.augmentation_law`` of the vMF, mixture and Langevin modes on the lake."""
    from m2m.stream.from_lake import filled_kappa
    from m2m_bench.langevin import augmentation_law

    sp = lake.splats()
    labels = sp.get("label")
    kappa = filled_kappa(np.asarray(sp["kappa"], dtype=np.float32), lake.dim).astype(np.float64)
    modes = augmentation_law(sp["mu"], lake.snapshot.read_all("neighbors"), kappa,
                             np.asarray(sp["alpha"], dtype=np.float64), None if labels is None else np.asarray(labels),
                             sample_rows=sample_rows, seed=seed, modes=("vmf", "mixture", "langevin"))
    target = next(iter(modes.values()))["own_responsibility_target"]
    return {"sample_rows": min(sample_rows, len(kappa)), "target_own_responsibility": target, "modes": modes}


def _train(lake: Any, data: Any, epochs: int, device: str, seed: int, importance: Any, generate: Any,
           desc: str) -> dict[str, Any]:
    """Train a linear head through the lake for ``epochs``, scored EVALS_PER_EPOCH times per epoch."""
    from m2m_bench.downstream import fit_through_lake, learning_rate, make_model

    model = make_model("linear", lake.dim, 10, seed).to(device)
    test_x = torch.from_numpy(data.test_x).to(device)
    test_y = torch.from_numpy(data.test_y).to(device)
    with Bar(epochs, desc, unit="epochs") as bar:
        return fit_through_lake(lake, model, test_x, test_y, epochs=epochs, lr=learning_rate("linear"),
                                importance=importance, generate=generate, batch_size=BATCH_SIZE, seed=seed,
                                evals_per_epoch=EVALS_PER_EPOCH, on_epoch=lambda e, acc: bar(1))


def _time_to_accuracy(curves: dict[str, Any], uniform_final: float) -> dict[str, Any]:
    """Rows and seconds each run streamed until TARGET_FRACTION x uniform's final accuracy, and the ratio."""
    from m2m_bench.downstream import to_target

    target = TARGET_FRACTION * uniform_final
    out: dict[str, Any] = {"target": target}
    for key, curve in curves.items():
        hit = to_target(curve, target)
        out[key] = None if hit is None else {"rows": hit[0], "seconds": hit[1]}
    mine, base = out["soc_langevin"], out["uniform"]
    out["speedup_rows"] = None if mine is None or base is None else base["rows"] / mine["rows"]
    return out


def _rows(reached: dict[str, Any] | None) -> str:
    return "not reached" if reached is None else f"{reached['rows']:,}"


def _table(res: dict[str, Any]) -> str:
    def num(v: float) -> str:
        return f"{v:,.0f}"

    tta = res["time_to_accuracy"]
    speedup = "-" if tta["speedup_rows"] is None else f"{tta['speedup_rows']:.2f}x"

    rows = [
        ("ingest, rows/s (atomic durable commit)", num(res["ingest_rows_s"]), num(ORIGINAL_README["ingest"])),
        ("stream, standard (SOC importance), rows/s", num(res["stream_rows_s"]["standard"]),
         num(ORIGINAL_README["standard"])),
        ("stream, generative (SOC + Langevin), rows/s", num(res["stream_rows_s"]["generative"]),
         num(ORIGINAL_README["generative"])),
        ("stream, vMF augmentation (SOC + vMF), rows/s", num(res["stream_rows_s"]["vmf"]), "-"),
        ("stream, mixture augmentation (SOC + mixture), rows/s", num(res["stream_rows_s"]["mixture"]), "-"),
        (f"test accuracy, SOC + Langevin ({sum(res['rows_per_epoch']['soc_langevin']):,} rows)",
         f"{100 * res['accuracy']['soc_langevin'][-1]:.2f}%", "-"),
        (f"test accuracy, uniform, raw lake ({sum(res['rows_per_epoch']['uniform']):,} rows)",
         f"{100 * res['accuracy']['uniform'][-1]:.2f}%", "-"),
        (f"rows to {TARGET_FRACTION:.0%} of uniform's final accuracy: uniform", _rows(tta["uniform"]), "-"),
        (f"rows to {TARGET_FRACTION:.0%} of uniform's final accuracy: SOC + Langevin", _rows(tta["soc_langevin"]),
         "-"),
        ("time-to-accuracy speed-up of SOC + Langevin (rows; below 1 = slower)", speedup, "-"),
    ]
    width = max(len(a) for a, _, _ in rows) + 2
    head = f"{'measure':<{width}}{'this run (measured)':>22}{'original M2M README':>22}"
    lines = [head, "-" * len(head)]
    lines += [f"{a:<{width}}{b:>22}{c:>22}" for a, b, c in rows]
    lines.append(f"streams: the consolidated lake ({res['consolidation']['rows_after']:,} splats), batch {BATCH_SIZE}, "
                 f"columns {'/'.join(STREAM_COLUMNS)}, {res['device']}, no model attached")
    lines.append(f"accuracy: linear classifier on {res['test_rows']:,} rows of held-out images after {res['epochs']} "
                 f"epochs of the raw lake (uniform) and the same row budget, "
                 f"{len(res['rows_per_epoch']['soc_langevin'])} epochs, of the consolidated lake (SOC + Langevin); "
                 f"rows = rows streamed into training")
    law = res["augmentation_law"]
    lines.append(f"what each augmentation produces ({law['sample_rows']:,} rows of the consolidated lake): mean cosine "
                 f"to the source row / mean own-component responsibility under the row's neighbourhood mixture "
                 f"(the mixture itself: {law['target_own_responsibility']:.3f})")
    lines.append("  " + " | ".join(f"{mode} {v['mean_cos_to_source']:.3f} / {v['own_responsibility']:.3f}"
                                   for mode, v in law["modes"].items()))
    lines.append("original M2M README: figures as published there (splats/s), quoted for comparison, not measured here")
    return "\n".join(lines)


def _plot(res: dict[str, Any], kappa: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    k = kappa[np.isfinite(kappa) & (kappa > 0)]
    bins = np.geomspace(k.min(), k.max(), 50) if len(k) and k.max() > k.min() else 50
    ax.hist(k, bins=bins, color="#4472c4")
    ax.set_xscale("log")
    ax.set_xlabel("kappa (vMF concentration of each splat's neighbourhood)")
    ax.set_ylabel("splats")
    ax.set_title(f"kappa of {len(kappa):,} splats (d = {res['dim']})")

    ax = axes[1]
    names = ["ingest", "standard", "generative"]
    labels = ["ingest", "stream\nstandard (SOC)", "stream\ngenerative (Langevin)"]
    ours = [res["ingest_rows_s"], res["stream_rows_s"]["standard"], res["stream_rows_s"]["generative"]]
    theirs = [ORIGINAL_README[n] for n in names]
    pos = np.arange(len(names))
    b1 = ax.bar(pos - 0.2, ours, 0.4, label="this run (measured)", color="#4472c4")
    b2 = ax.bar(pos + 0.2, theirs, 0.4, label="original M2M README (published)", color="#bbbbbb")
    for bars in (b1, b2):
        for bar in bars:
            ax.annotate(f"{bar.get_height():,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=max(ours + theirs) * 8)
    ax.set_xticks(pos, labels)
    ax.set_ylabel("rows/s (log scale)")
    ax.set_title(f"throughput ({res['device']})")
    ax.legend(fontsize=8, loc="upper right")

    ax = axes[2]
    for key, style, label in (("soc_langevin", "o-", "SOC + Langevin (consolidated lake)"),
                              ("uniform", "s--", "uniform stream (raw lake)")):
        curve = np.asarray(res["curves"][key], dtype=np.float64)
        ax.plot(curve[:, 0] / 1e3, 100 * curve[:, 2], style, markersize=3, label=label)
    target = res["time_to_accuracy"]["target"]
    ax.axhline(100 * target, color="#888888", lw=0.8, ls=":",
               label=f"{TARGET_FRACTION:.0%} of uniform's final accuracy")
    ax.set_xlabel(f"thousands of rows streamed (scored {EVALS_PER_EPOCH}x per epoch)")
    ax.set_ylabel("test accuracy (%), held-out images")
    ax.set_title("linear classifier trained through the lake")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.suptitle(f"m2m demo: sklearn digits, {res['train_rows']:,} train / {res['test_rows']:,} test rows "
                 f"(split by image), seed {res['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(rows: int = 10_000, dim: int = 640, epochs: int = 5, device: str = "cpu", out_dir: str = ".",
             lake_dir: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run the demo, print its table and the report's path; returns every measured figure."""
    from m2m import M2MConfig, create_m2m
    from m2m_bench.datasets import digits_embeddings

    _check_args(rows, dim, epochs, seed)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    data = digits_embeddings(rows=rows, dim=dim, seed=seed)
    n_img = len(np.unique(data.train_image)), len(np.unique(data.test_image))
    click.echo(f"m2m demo: sklearn digits, {rows:,} rows resampled from 1,797 images, projected 64 -> {dim} "
               f"(seed {seed})")
    click.echo(f"  train {len(data.train_y):,} rows ({n_img[0]:,} images), test {len(data.test_y):,} rows "
               f"({n_img[1]:,} held-out images), device {device}")
    cfg = M2MConfig(path=lake_dir, latent_dim=dim, device=device, seed=seed)
    res: dict[str, Any] = {"rows": rows, "dim": dim, "epochs": epochs, "device": device, "seed": seed,
                           "train_rows": int(len(data.train_y)), "test_rows": int(len(data.test_y))}
    with create_m2m(cfg) as lake:
        if len(lake):
            raise ConfigError(f"--lake {lake_dir} already holds {len(lake):,} rows; give a new directory")
        res["ingest_rows_s"] = _ingest(lake, data.train_x, data.train_y)
        kappa, res["kappa_seconds"] = _with_bar(len(lake), "kappa", lambda bar: lake.estimate_kappa(progress=bar))
        kappa = np.asarray(kappa, dtype=np.float64)
        res["kappa"] = {"min": float(kappa.min()), "median": float(np.median(kappa)), "max": float(kappa.max())}
        click.echo(f"  ingest {res['ingest_rows_s']:,.0f} rows/s; kappa median {res['kappa']['median']:,.0f} "
                   f"(range {res['kappa']['min']:,.0f}-{res['kappa']['max']:,.0f}) in {res['kappa_seconds']:.2f} s")
        base = _train(lake, data, epochs, device, seed, False, False, "train uniform")
        res["accuracy"] = {"uniform": base["accuracy"]}
        res["rows_per_epoch"] = {"uniform": base["rows_per_epoch"]}
        crit = lake.criticality()
        report, res["consolidate_seconds"] = _with_bar(
            len(lake), "consolidate", lambda bar: lake.consolidate(cfg.consolidate_similarity, progress=bar))
        res["criticality"] = {"redundancy": float(crit["redundancy"]), "state": crit["state"]}
        res["consolidation"] = {"similarity": cfg.consolidate_similarity, "rows_before": int(report.rows_before),
                                "rows_after": int(report.rows_after), "groups_merged": int(report.groups_merged)}
        click.echo(f"  criticality: redundancy {crit['redundancy']:.3f} ({crit['state']}, threshold "
                   f"{cfg.soc_threshold}); consolidated at cosine >= {cfg.consolidate_similarity}: "
                   f"{report.rows_before:,} -> {report.rows_after:,} splats ({report.groups_merged:,} groups) "
                   f"in {res['consolidate_seconds']:.2f} s")
        res["stream_rows_s"] = {"standard": _stream_rate(lake, False, seed),
                                "generative": _stream_rate(lake, "langevin", seed),
                                "vmf": _stream_rate(lake, "vmf", seed),
                                "mixture": _stream_rate(lake, "mixture", seed)}
        res["augmentation_law"] = _law(lake, seed)
        # the same row budget as uniform on the raw lake, so time to accuracy compares like with like
        soc_epochs = max(epochs, math.ceil(sum(base["rows_per_epoch"]) / max(len(lake), 1)))
        fit = _train(lake, data, soc_epochs, device, seed, True, "langevin", "train SOC + Langevin")
        res["accuracy"]["soc_langevin"] = fit["accuracy"]
        res["rows_per_epoch"]["soc_langevin"] = fit["rows_per_epoch"]
        res["curves"] = {"uniform": base["curve"], "soc_langevin": fit["curve"]}
        res["time_to_accuracy"] = _time_to_accuracy(res["curves"], base["accuracy"][-1])
        res["train_seconds"] = fit["seconds"]
        res["lake_path"] = lake.path
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, REPORT_NAME))
    _plot(res, kappa, path)
    res["report"] = path
    res["seconds"] = time.perf_counter() - t_start
    click.echo("")
    click.echo(_table(res))
    click.echo("")
    if lake_dir is not None:
        click.echo(f"lake kept at {res['lake_path']}")
    click.echo(f"report: {path}")
    click.echo(f"demo finished in {res['seconds']:.1f} s")
    return res
