"""Generative-stream benchmark: our Langevin augmenter | the straightforward chain | the gather limit.

Data: 100k x 640 unit vectors in 1,000 vMF clusters of mean cosine 0.9 to their centre, held in a RAM
tensor (float32, then float16 storage delivered as float32), alpha = 1, kappa of each splat from
``neighbourhood_kappa`` (``--quick``: the generating kappa), and a neighbour table of k = 16 random
members of the row's cluster (what a kNN search returns here: cosine ~0.81). Batches of 256 rows in a
random order, 5 Langevin steps at the default step size, one torch thread. Each method is timed in
several interleaved rounds and its best round is kept (the machine is shared).

  limit  torch.index_select of the batch into a reused buffer (the stream's physical limit)
  naive  gather the batch rows and their 16 x 256 neighbour rows into a reused buffer, then 5
         full-dimensional steps (``langevin.full_chain``: bmm dot products, randn [256, 640] per step)
  ours   gather the batch, then ``LangevinAugmenter`` (two-coordinate chain + one direction draw for
         rows whose neighbours are provably negligible, exact coupled rerun for the others)
  vmf    gather the batch, then ``VMFAugmenter`` (one exact vMF draw per row)

These kernel rates run in one thread, in line. ``stream_rates`` then measures the real thing through a
lake (kNN + kappa estimated by the lake): the plain stream, the Langevin stream (its draws made in the
stream's prefetch thread, ``PrepareAugment``), the same with ``prefetch=0`` (everything in the consuming
thread) and the vMF stream, each alone and feeding a small MLP's training step (one SGD step per batch).
The goal (300k rows/s) is checked on the Langevin stream.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from m2m.augment.augmenter import LangevinAugmenter, MixtureAugmenter, VMFAugmenter
from m2m.augment.energy import DEFAULT_STEP_SIZE, component_log_weights, step_length
from m2m.augment.langevin import full_chain
from m2m.geometry.kappa import neighbourhood_kappa
from m2m.geometry.vmf import kappa_from_mean_resultant
from m2m.geometry.vmf import sample as vmf_sample

__all__ = ["GOAL_ROWS_PER_S", "format_table", "headline", "run", "stream_rates"]

ROWS, DIM, K, BATCH, STEPS, CLUSTERS = 100_000, 640, 16, 256, 5, 1_000
GOAL_ROWS_PER_S = 300_000


def _data(rows: int, seed: int) -> tuple[torch.Tensor, np.ndarray, float]:
    g = torch.Generator().manual_seed(seed)
    clusters = max(1, min(CLUSTERS, rows // 20))
    per = rows // clusters
    centres = torch.nn.functional.normalize(torch.randn(clusters, DIM, generator=g), dim=1)
    kappa = kappa_from_mean_resultant(0.9, DIM).item()
    x = vmf_sample(centres, torch.full((clusters,), kappa), per, generator=g).reshape(-1, DIM).contiguous()
    members = np.arange(clusters * per).reshape(clusters, per)
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(clusters), per)
    neighbors = members[owner[:, None], rng.integers(0, per, (clusters * per, K))].astype(np.int64)
    return x, neighbors, kappa


def _rate(fn: Callable[[torch.Tensor], Any], order: torch.Tensor, batches: int) -> tuple[float, float]:
    """(rows per wall second, rows per CPU second of this thread)."""
    fn(order[:BATCH])                                         # warm-up (tables, allocator)
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(batches):
        j = (i % (order.numel() // BATCH)) * BATCH
        fn(order[j:j + BATCH])
    rows = batches * BATCH
    return rows / (time.perf_counter() - t0), rows / max(time.thread_time() - c0, 1e-9)


def run(quick: bool = False, rows: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Measure rows/s of limit | naive | ours | vmf for float32 and float16 storage; returns a dict."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick, ROWS if rows is None else rows, seed)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, rows: int, seed: int) -> dict[str, Any]:
    x32, neighbors, kappa_true = _data(rows, seed)
    n = x32.shape[0]
    t0 = time.perf_counter()
    kappa = (np.full(n, kappa_true, np.float32) if quick else neighbourhood_kappa(x32, neighbors))
    kappa_s = time.perf_counter() - t0
    alpha = np.ones(n, np.float32)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    rounds = 2 if quick else 3
    n_fast, n_naive = (150, 12) if quick else (600, 40)
    res: dict[str, Any] = {"rows": n, "dim": DIM, "batch": BATCH, "k": K, "steps": STEPS,
                           "step_size": DEFAULT_STEP_SIZE, "kappa_median": float(np.median(kappa)),
                           "kappa_seconds": None if quick else kappa_s, "threads": 1}
    kt = torch.from_numpy(kappa).double()
    lwt = component_log_weights(kt, torch.from_numpy(alpha).double(), DIM)
    nbt = torch.from_numpy(neighbors)
    for name, store in (("f32", x32), ("f16", x32.to(torch.float16))):
        buf = torch.empty(BATCH, DIM, dtype=store.dtype)
        out = torch.empty(BATCH, DIM)
        nbuf = torch.empty(BATCH * (K + 1), DIM, dtype=store.dtype)
        nbuf32 = torch.empty(BATCH * (K + 1), DIM)

        def gather(pos: torch.Tensor, store: torch.Tensor = store) -> torch.Tensor:
            return store.index_select(0, pos).to(torch.float32)

        def batch(r: torch.Tensor, store: torch.Tensor = store, buf: torch.Tensor = buf,
                  out: torch.Tensor = out) -> torch.Tensor:
            torch.index_select(store, 0, r, out=buf)
            return buf if buf.dtype == torch.float32 else out.copy_(buf)

        t0 = time.perf_counter()
        aug = LangevinAugmenter(neighbors, kappa, alpha, steps=STEPS).to("cpu", DIM, gather)
        build_s = time.perf_counter() - t0
        vaug = VMFAugmenter(kappa).to("cpu")
        maug = MixtureAugmenter(neighbors, kappa, alpha).to("cpu")
        gen = torch.Generator().manual_seed(seed + 2)

        def mixture(r: torch.Tensor) -> torch.Tensor:
            return maug(batch(r), r, gather, gen)

        def ours(r: torch.Tensor) -> torch.Tensor:
            return aug(batch(r), r, gather, gen)

        def vmf(r: torch.Tensor) -> torch.Tensor:
            return vaug(batch(r), r, gather, gen)

        def naive(r: torch.Tensor, store: torch.Tensor = store, nbuf: torch.Tensor = nbuf,
                  nbuf32: torch.Tensor = nbuf32) -> torch.Tensor:
            # a careful straightforward version: one gather of the rows and their neighbours into a
            # reused buffer, per-splat tables, then 5 full-dimensional steps
            idx = torch.cat([r.unsqueeze(1), nbt[r]], 1)                       # [B, 1 + k]
            torch.index_select(store, 0, idx.reshape(-1), out=nbuf)
            mu = (nbuf if nbuf.dtype == torch.float32 else nbuf32.copy_(nbuf)).view(BATCH, K + 1, DIM)
            kk, lw = kt[idx], lwt[idx]
            h = step_length(DEFAULT_STEP_SIZE, kk[:, :1], None, DIM, 1.0)   # the row's own kappa sets the step
            return full_chain(mu[:, 0], mu, kk.float(), (lw - lw[:, :1]).float(), h, STEPS, 1.0, gen, False)

        best = {"limit": 0.0, "naive": 0.0, "ours": 0.0, "vmf": 0.0, "mixture": 0.0}
        cpu = dict(best)
        for _ in range(rounds):
            for key, fn, nb in (("limit", batch, 8 * n_fast), ("ours", ours, n_fast), ("vmf", vmf, n_fast),
                                ("mixture", mixture, n_fast), ("naive", naive, n_naive)):
                wall, per_cpu = _rate(fn, order, nb)
                best[key], cpu[key] = max(best[key], wall), max(cpu[key], per_cpu)
        sample_rows = order[:BATCH]
        src = batch(sample_rows).clone()
        cos = {m: float((fn(sample_rows) * src).sum(1).mean()) for m, fn in (("ours", ours), ("naive", naive),
                                                                            ("vmf", vmf), ("mixture", mixture))}
        res[name] = {**best, "cpu_rows_per_s": cpu, "table_build_seconds": build_s, "fast_fraction": aug.fast_fraction,
                     "mean_cos_to_source": cos}
    f32, f16 = res["f32"], res["f16"]
    res["ratios"] = {
        "ours_vs_naive_f32": f32["ours"] / f32["naive"],
        "ours_vs_limit_f32": f32["ours"] / f32["limit"],
        "vmf_vs_naive_f32": f32["vmf"] / f32["naive"],
        "ours_vs_naive_f16": f16["ours"] / f16["naive"],
        "naive_f16_vs_f32": f16["naive"] / f32["naive"],
        "ours_vs_naive_f32_cpu": f32["cpu_rows_per_s"]["ours"] / f32["cpu_rows_per_s"]["naive"],
    }
    res["stream"] = stream_rates(20_000 if quick else 100_000, seed)
    res["goal"] = {"ours_rows_per_s": GOAL_ROWS_PER_S, "measure": "Langevin stream through a lake",
                   "met": res["stream"]["langevin"] >= GOAL_ROWS_PER_S}
    return res


def stream_rates(rows: int, seed: int = 0, rounds: int = 2) -> dict[str, Any]:
    """Through a real lake: one epoch of `export_to_dataloader` plain | Langevin | vMF (rows/s, best round).

    The lake holds the clustered data above (float32), kappa and neighbours estimated by the lake
    itself (FAISS kNN, k = 16); the estimation time is reported separately.
    """
    from m2m.api import create_m2m
    from m2m.config import M2MConfig

    x, _, _ = _data(rows, seed)
    out: dict[str, Any] = {"rows": int(x.shape[0])}
    with create_m2m(M2MConfig(latent_dim=DIM, knn_k=K, seed=seed)) as lake:
        lake.add_splats(x)
        t0 = time.perf_counter()
        lake.estimate_kappa()
        out["estimate_kappa_seconds"] = time.perf_counter() - t0
        loaders = {mode: lake.export_to_dataloader(batch_size=BATCH, generate_samples=gen, prefetch=prefetch)
                   for mode, gen, prefetch in (("plain", False, 4), ("langevin", "langevin", 4), ("vmf", "vmf", 4),
                                               ("mixture", "mixture", 4), ("langevin_inline", "langevin", 0))}
        for dl in loaders.values():  # first epoch: fills the warm tier, builds the augmenter tables
            for _ in dl:
                pass
        best = {mode: 0.0 for mode in loaders}
        train = {mode: 0.0 for mode in ("plain", "langevin", "langevin_inline")}
        step = _training_step(seed)
        for _ in range(rounds):
            for mode, dl in loaders.items():
                t0 = time.perf_counter()
                n = sum(len(b) for b in dl)
                best[mode] = max(best[mode], n / (time.perf_counter() - t0))
            for mode in train:  # the same streams feeding a training step (what the draw-ahead is for)
                t0 = time.perf_counter()
                n = sum(step(b) for b in loaders[mode])
                train[mode] = max(train[mode], n / (time.perf_counter() - t0))
        out.update(best)
        out["training"] = train
        for dl in loaders.values():
            dl.close()
    out["langevin_vs_plain"] = out["langevin"] / out["plain"]
    out["langevin_vs_inline"] = out["langevin"] / out["langevin_inline"]
    return out


def _training_step(seed: int) -> Callable[[torch.Tensor], int]:
    """One SGD step of a small MLP (640 -> 256 -> 10) on a batch; returns the batch's rows."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    target = torch.randint(0, 10, (BATCH,), generator=g)

    def step(batch: torch.Tensor) -> int:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), target[:len(batch)]).backward()
        opt.step()
        return len(batch)

    return step


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the `m2m bench` summary table."""
    f32, st = res["f32"], res["stream"]
    return [
        {"measure": "Langevin augment kernel f32 (rows/s)", "ours": f32["ours"], "baseline": f32["naive"],
         "baseline_name": "naive chain", "limit": f32["limit"], "limit_name": "batch gather"},
        {"measure": "generative stream via lake (rows/s)", "ours": st["langevin"], "baseline": None,
         "limit": st["plain"], "limit_name": "plain stream"},
        {"measure": "vMF-augmented stream via lake (rows/s)", "ours": st["vmf"], "baseline": None,
         "limit": st["plain"], "limit_name": "plain stream"},
        {"measure": "mixture-augmented stream via lake (rows/s)", "ours": st["mixture"], "baseline": None,
         "limit": st["plain"], "limit_name": "plain stream"},
    ]


def format_table(res: dict[str, Any]) -> str:
    """One side-by-side table: rows/s and ratios to the naive chain and to the gather limit."""
    lines = [f"Langevin stream benchmark: {res['rows']:,} x {res['dim']} rows, batch {res['batch']}, "
             f"k={res['k']} neighbours, {res['steps']} steps, step_size {res['step_size']}, "
             f"{res['threads']} thread, median kappa {res['kappa_median']:.0f}",
             f"{'what':44s} {'f32 rows/s':>12s} {'f16 rows/s':>12s} {'x naive':>8s} {'x limit':>8s}"]
    labels = {"limit": "limit: gather the batch (index_select)", "naive": "naive: gather 16 neighbours + 5 full steps",
              "ours": "ours: LangevinAugmenter", "vmf": "ours: VMFAugmenter (exact vMF draw)",
              "mixture": "ours: MixtureAugmenter (exact mixture draw)"}
    f32, f16 = res["f32"], res["f16"]
    for key, label in labels.items():
        lines.append(f"{label:44s} {f32[key]:12,.0f} {f16[key]:12,.0f} {f32[key] / f32['naive']:8.1f} "
                     f"{f32[key] / f32['limit']:8.3f}")
    lines.append("rows per CPU-second of the thread (less sensitive to the shared machine), f32: "
                 + ", ".join(f"{k} {v:,.0f}" for k, v in f32["cpu_rows_per_s"].items()))
    lines.append(f"one-component path: {100 * (f32['fast_fraction'] or 0):.1f}% of splats; table build "
                 f"{f32['table_build_seconds']:.1f} s (f32), {f16['table_build_seconds']:.1f} s (f16)"
                 + ("" if res["kappa_seconds"] is None else f"; neighbourhood_kappa {res['kappa_seconds']:.1f} s"))
    cos = f32["mean_cos_to_source"]
    lines.append("mean cosine to the source row: " + ", ".join(f"{k} {v:.4f}" for k, v in cos.items()))
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()))
    st = res.get("stream")
    if st:
        lines.append(f"through a lake ({st['rows']:,} rows, kappa+kNN estimated in {st['estimate_kappa_seconds']:.1f} s): "
                     f"plain stream {st['plain']:,.0f} rows/s | Langevin stream {st['langevin']:,.0f} "
                     f"({st['langevin_vs_plain']:.2f}x plain; draws made in the prefetch thread) | same, in line "
                     f"(prefetch=0, one thread) {st['langevin_inline']:,.0f} | vMF stream {st['vmf']:,.0f} | "
                     f"mixture stream {st['mixture']:,.0f}")
        tr = st["training"]
        lines.append(f"feeding an MLP training step (640-256-10, SGD), rows/s: plain {tr['plain']:,.0f} | Langevin "
                     f"{tr['langevin']:,.0f} ({tr['langevin'] / tr['plain']:.2f}x plain) | Langevin in line "
                     f"{tr['langevin_inline']:,.0f} ({tr['langevin_inline'] / tr['plain']:.2f}x plain)")
    goal = res["goal"]
    lines.append(f"goal >= {goal['ours_rows_per_s']:,} rows/s ({goal['measure']}): {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# what each augmentation mode produces (law, not speed)
# --------------------------------------------------------------------------------------------

LAW_MODES = ("vmf", "mixture", "langevin", "langevin_mala300")


def augmentation_law(mu: np.ndarray, neighbors: np.ndarray, kappa: np.ndarray, alpha: np.ndarray,
                     labels: np.ndarray | None, sample_rows: int = 2048, seed: int = 0,
                     modes: tuple[str, ...] = LAW_MODES) -> dict[str, dict[str, float]]:
    """Per mode: mean cosine of an augmented row to its source row and its mean own-component
    responsibility under the row's neighbourhood mixture.

    The mixture of row i has the components {i} and its same-label neighbours; the own-component
    responsibility of a draw y is r_i(y) = softmax_j(log alpha_j + log C_d(kappa_j) + kappa_j mu_j.y)
    at j = i. Under the exact mixture its mean is alpha_i / sum_j alpha_j. Modes: "vmf" (the row's own
    vMF), "mixture" (exact draws from the mixture, the target), "langevin" (the default chain: 5 ULA
    steps at the default step size from the row), "langevin_mala300" (300 MALA steps from the row).
    """
    n, d = mu.shape
    mu_t = torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float32))
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(np.sort(rng.choice(n, size=min(sample_rows, n), replace=False)).astype(np.int64))

    def gather(pos: torch.Tensor) -> torch.Tensor:
        return mu_t.index_select(0, pos)

    nb = np.asarray(neighbors, dtype=np.int64)
    valid = (nb >= 0) & (nb != np.arange(n)[:, None])
    if labels is not None:
        valid &= labels[np.maximum(nb, 0)] == labels[:, None]
    comp = torch.from_numpy(np.concatenate([np.arange(n)[:, None], np.maximum(nb, 0)], 1))[rows]
    present = torch.from_numpy(np.concatenate([np.ones((n, 1), bool), valid], 1))[rows]
    kt = torch.from_numpy(np.asarray(kappa, dtype=np.float64))
    log_w = component_log_weights(kt, torch.from_numpy(np.asarray(alpha, dtype=np.float64)), d)
    kc, ac = kt[comp], torch.where(present, log_w[comp], torch.full((), -math.inf, dtype=torch.float64))
    mc = mu_t[comp].double()                                                      # [R, K, d]
    augmenters: dict[str, Any] = {
        "vmf": VMFAugmenter(kappa),
        "mixture": MixtureAugmenter(nb, kappa, alpha, labels),
        "langevin": LangevinAugmenter(nb, kappa, alpha, labels, steps=STEPS),
        "langevin_mala300": LangevinAugmenter(nb, kappa, alpha, labels, steps=300, metropolis=True),
    }
    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        y = augmenters[mode](mu_t[rows], rows, gather, torch.Generator().manual_seed(seed + 1)).double()
        logits = ac + kc * torch.bmm(mc, y.unsqueeze(2)).squeeze(2)
        resp = torch.softmax(logits, 1)[:, 0]
        cos = (y * mu_t[rows].double()).sum(1)
        out[mode] = {"mean_cos_to_source": float(cos.mean()), "own_responsibility": float(resp.mean()),
                     "own_responsibility_target": float(torch.softmax(torch.where(present, torch.log(
                         torch.from_numpy(np.asarray(alpha, dtype=np.float64))[comp]),
                         torch.full((), -math.inf, dtype=torch.float64)), 1)[:, 0].mean())}
    return out


def law_on_digits(dims: tuple[int, ...] = (64, 384), rows: int = 10_000, seed: int = 0,
                  sample_rows: int = 2048) -> dict[str, Any]:
    """``augmentation_law`` on kNN lakes of the digits protocol (``m2m_bench.datasets.digits_embeddings``), the
    lake estimating kappa and neighbours itself (k = 16, labelled rows, not consolidated)."""
    from m2m.api import create_m2m
    from m2m.config import M2MConfig
    from m2m.stream.from_lake import filled_kappa
    from m2m_bench.datasets import digits_embeddings

    res: dict[str, Any] = {"rows": rows, "seed": seed, "sample_rows": sample_rows, "k": K, "by_dim": {}}
    for d in dims:
        data = digits_embeddings(rows=rows, dim=d, seed=seed)
        with create_m2m(M2MConfig(latent_dim=d, knn_k=K, seed=seed)) as lake:
            lake.add_splats(data.train_x, labels=data.train_y)
            lake.estimate_kappa()
            sp = lake.splats()
            kap = filled_kappa(np.asarray(sp["kappa"], dtype=np.float32), d).astype(np.float64)
            res["by_dim"][str(d)] = {
                "kappa_median": float(np.median(kap)),
                "modes": augmentation_law(sp["mu"], lake.snapshot.read_all("neighbors"), kap,
                                          np.asarray(sp["alpha"], dtype=np.float64), np.asarray(sp["label"]),
                                          sample_rows=sample_rows, seed=seed)}
    return res
