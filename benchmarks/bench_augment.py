"""Augmentation speed, side by side in one run: the Langevin rerun in span coordinates vs today's
d-dimensional kernel, vMF and mixture draws vs a plain index_select stream, at d = 64..1024.

    PYTHONPATH=src:benchmarks python benchmarks/bench_augment.py [--quick] [--no-stream] [--out benchmarks/results/augment-DATE.json]

Every rate is measured in several interleaved rounds and every round is kept (min/median/max), as rows
per wall second and rows per CPU second of the process (``time.process_time``: it counts our own
threads, spinning ones included, and not other processes, so on a shared machine it is the steadier
figure); the load average is recorded with each section. One torch thread, in line (no prefetch).

Sections:
  kernels   per d: limit (index_select of the batch into a reused buffer), vmf, mixture (augmenters
            applied to that batch), langevin (``LangevinAugmenter``, span rerun) and langevin_full
            (same, rerun by ``coupled_full_chain`` in d dimensions), on clustered unit rows
            (mean cosine 0.9 to the cluster centre, k = 16 same-cluster neighbours).
  demo      the demo's lake (``m2m demo``: digits, 10k rows, d = 640, kappa estimated, consolidated):
            the Langevin augmenter in line with either rerun kernel, the share of rows rerun, and the
            generative stream (SOC + Langevin, ``m2m_bench.demo._stream_rate``) with either kernel.
  threads   the vMF loop at d = 256 with torch threads 1 and 2 (oversubscription check).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

import m2m.augment.augmenter as augmenter_mod
from m2m.augment.augmenter import LangevinAugmenter, MixtureAugmenter, VMFAugmenter
from m2m.augment.langevin import coupled_full_chain
from m2m.augment.span import span_coupled_chain
from m2m.geometry.vmf import kappa_from_mean_resultant
from m2m.geometry.vmf import sample as vmf_sample

BATCH, K = 256, 16


def _rate(fn: Callable[[torch.Tensor], Any], order: torch.Tensor, batches: int) -> tuple[float, float]:
    fn(order[:BATCH])
    nb = order.numel() // BATCH
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(batches):
        j = (i % nb) * BATCH
        fn(order[j:j + BATCH])
    rows = batches * BATCH
    return rows / (time.perf_counter() - t0), rows / max(time.process_time() - c0, 1e-9)


def _summary(walls: list[float], cpus: list[float]) -> dict[str, Any]:
    return {"wall": walls, "cpu": cpus,
            "wall_median": statistics.median(walls), "cpu_median": statistics.median(cpus),
            "cpu_min": min(cpus), "cpu_max": max(cpus)}


def _measure(fns: dict[str, tuple[Callable[[torch.Tensor], Any], int]], order: torch.Tensor,
             rounds: int) -> dict[str, Any]:
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, (fn, nb) in fns.items():
            w, c = _rate(fn, order, nb)
            walls[key].append(w)
            cpus[key].append(c)
    out = {k: _summary(walls[k], cpus[k]) for k in fns}
    out["load_average"] = os.getloadavg()
    return out


def _clustered(rows: int, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray, float]:
    g = torch.Generator().manual_seed(seed)
    clusters = max(1, rows // 100)
    per = rows // clusters
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    kappa = kappa_from_mean_resultant(0.9, dim).item()
    x = vmf_sample(centres, torch.full((clusters,), kappa), per, generator=g).reshape(-1, dim).contiguous()
    members = np.arange(clusters * per).reshape(clusters, per)
    owner = np.repeat(np.arange(clusters), per)
    nb = members[owner[:, None], np.random.default_rng(seed).integers(0, per, (clusters * per, K))]
    return x, nb.astype(np.int64), kappa


def _augment_fns(x: torch.Tensor, neighbors: np.ndarray, kappa: np.ndarray, alpha: np.ndarray,
                 labels: np.ndarray | None, cos: np.ndarray | None, batches: int,
                 full_batches: int) -> tuple[dict[str, tuple[Callable[[torch.Tensor], Any], int]], dict[str, Any]]:
    n, d = x.shape
    buf = torch.empty(BATCH, d)

    def gather(pos: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, pos)

    def batch(r: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, 0, r, out=buf)

    lang = LangevinAugmenter(neighbors, kappa, alpha, labels, neighbor_cos=cos).to("cpu", d, gather)
    full = LangevinAugmenter(neighbors, kappa, alpha, labels, neighbor_cos=cos).to("cpu", d, gather)
    full._rerun_kernel = coupled_full_chain
    vaug = VMFAugmenter(kappa).to("cpu")
    maug = MixtureAugmenter(neighbors, kappa, alpha, labels).to("cpu")
    gen = torch.Generator().manual_seed(1)
    fns: dict[str, tuple[Callable[[torch.Tensor], Any], int]] = {
        "limit": (batch, 4 * batches),
        "vmf": (lambda r: vaug(batch(r), r, gather, gen), batches),
        "mixture": (lambda r: maug(batch(r), r, gather, gen), batches),
        "langevin": (lambda r: lang(batch(r), r, gather, gen), batches),
        "langevin_full": (lambda r: full(batch(r), r, gather, gen), full_batches),
    }
    # share of rows the augmenter reruns with all components
    g = torch.Generator().manual_seed(2)
    rerun = 0
    for _ in range(20):
        r = torch.randint(0, n, (BATCH,), generator=g)
        rerun += lang.prepare(r, d, g, torch.float32, gather).fail.numel()
    return fns, {"fast_fraction": lang.fast_fraction, "rerun_share": rerun / (20 * BATCH)}


def _ratios(res: dict[str, Any]) -> dict[str, float]:
    m = {k: v["cpu_median"] for k, v in res.items() if isinstance(v, dict) and "cpu_median" in v}
    return {"langevin_span_vs_full_cpu": m["langevin"] / m["langevin_full"],
            "langevin_vs_limit_cpu": m["langevin"] / m["limit"],
            "vmf_vs_limit_cpu": m["vmf"] / m["limit"], "mixture_vs_limit_cpu": m["mixture"] / m["limit"]}


def kernels(dims: tuple[int, ...], rows: int, rounds: int, batches: int, seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dims:
        x, nb, kap = _clustered(rows, d, seed)
        kappa = np.full(x.shape[0], kap)
        fns, info = _augment_fns(x, nb, kappa, np.ones(x.shape[0]), None, None, batches, max(2, batches // 4))
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + 1))
        res = _measure(fns, order, rounds)
        res.update(info, kappa=kap, ratios=_ratios(res))
        out[str(d)] = res
        _log(f"d={d}: " + ", ".join(f"{k} {res[k]['cpu_median']:,.0f}" for k in fns) + " rows/CPU-s; "
             f"load {res['load_average'][0]:.1f}")
    return out


def demo(rounds: int, batches: int, stream: bool, seed: int = 0) -> dict[str, Any]:
    from m2m_bench.datasets import digits_embeddings
    from m2m_bench.demo import _stream_rate

    from m2m import M2MConfig, create_m2m
    from m2m.export import filled_kappa, stored_geometry

    torch.set_num_threads(1)
    data = digits_embeddings(rows=10_000, dim=640, seed=seed)
    cfg = M2MConfig(latent_dim=640, seed=seed)
    out: dict[str, Any] = {}
    with create_m2m(cfg) as lake:
        lake.add_splats(data.train_x, labels=data.train_y)
        lake.estimate_kappa()
        lake.consolidate(cfg.consolidate_similarity)
        snap = lake.snapshot
        geo = stored_geometry(snap)
        x = torch.from_numpy(np.ascontiguousarray(lake.splats()["mu"], dtype=np.float32))
        kappa = filled_kappa(snap.read_all("kappa").astype(np.float32), 640).astype(np.float64)
        fns, info = _augment_fns(x, geo.neighbors, kappa, snap.read_all("alpha").astype(np.float64),
                                 snap.read_all("label"), geo.neighbor_cos, batches, batches)
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + 1))
        res = _measure(fns, order, rounds)
        res.update(info, rows=int(x.shape[0]), ratios=_ratios(res))
        out["inline"] = res
        _log("demo lake in line: " + ", ".join(f"{k} {res[k]['cpu_median']:,.0f}" for k in fns)
             + f" rows/CPU-s; rerun share {info['rerun_share']:.2f}; load {res['load_average'][0]:.1f}")
        if stream:
            st: dict[str, Any] = {}
            for name, kernel in (("span", span_coupled_chain), ("full", coupled_full_chain)):
                augmenter_mod.span_coupled_chain = kernel   # what new LangevinAugmenters rerun with
                try:
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    st[name] = {"rows_per_s": _stream_rate(lake, "langevin", seed)}
                    st[name]["process_cpu_share"] = (time.process_time() - c0) / (time.perf_counter() - t0)
                finally:
                    augmenter_mod.span_coupled_chain = span_coupled_chain
            st["plain_rows_per_s"] = _stream_rate(lake, False, seed)
            st["span_vs_full"] = st["span"]["rows_per_s"] / st["full"]["rows_per_s"]
            st["load_average"] = os.getloadavg()
            out["stream"] = st
            _log(f"demo generative stream: span {st['span']['rows_per_s']:,.0f}, full {st['full']['rows_per_s']:,.0f}"
                 f" rows/s (x{st['span_vs_full']:.2f}); plain {st['plain_rows_per_s']:,.0f}")
    return out


def threads(rounds: int, batches: int, seed: int = 0) -> dict[str, Any]:
    x, _, kap = _clustered(20_000, 256, seed)
    vaug = VMFAugmenter(np.full(x.shape[0], kap))
    buf = torch.empty(BATCH, 256)
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + 1))

    def vmf(r: torch.Tensor) -> torch.Tensor:
        return vaug(torch.index_select(x, 0, r, out=buf), r, None, gen)  # type: ignore[arg-type]

    fixed = x[:BATCH].clone()

    def limit(r: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, 0, r, out=buf)

    def vmf_only(r: torch.Tensor) -> torch.Tensor:   # the augmenter alone, on an already gathered batch
        return vaug(fixed, r, None, gen)  # type: ignore[arg-type]

    out: dict[str, Any] = {}
    for t in (1, 2):
        torch.set_num_threads(t)
        out[f"torch_threads_{t}"] = _measure({"limit": (limit, 4 * batches), "vmf": (vmf, batches),
                                              "vmf_only": (vmf_only, batches)}, order, rounds)
    torch.set_num_threads(1)
    for key in ("limit", "vmf", "vmf_only"):
        _log(f"d=256 {key} rows/CPU-s, torch threads 1 | 2: " + " | ".join(
            f"{v[key]['cpu_min']:,.0f}-{v[key]['cpu_max']:,.0f}" for v in out.values()))
    return out


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-stream", action="store_true", help="skip the demo stream (lake epochs)")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds, batches = (2, 20) if args.quick else (3, 60)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "batch": BATCH, "k": K,
                           "cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
                           "command": "PYTHONPATH=src:benchmarks python benchmarks/bench_augment.py " + " ".join(argv or sys.argv[1:])}
    res["kernels"] = kernels((64, 256, 1024) if args.quick else (64, 128, 256, 512, 1024), 20_000, rounds, batches)
    res["threads"] = threads(rounds, batches)
    res["demo"] = demo(rounds, batches // 2, not args.no_stream)
    res["seconds"] = time.perf_counter() - t0
    text = json.dumps(res, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
