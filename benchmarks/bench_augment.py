"""Augmentation speed, side by side in one run: ours | the seed's published 34,993 rows/s | a bare
numpy/torch loop of the same math (what a user would write) | the noise floor, at d = 64..1024.

    PYTHONPATH=src:benchmarks python benchmarks/bench_augment.py [--quick] [--no-stream] [--repeats N] [--out benchmarks/results/augment-DATE.json]

The goal (issue #20) is >= 350k rows/s (10x the seed's 34,993) for vMF, mixture and the demo's
generative stream. ``floor`` is the index_select of the batch plus one float32 N(0, 1) draw of
[B, d] (the samplers' own fill, ``HostNoise.normal_``, into a reused buffer; torch's ``normal_`` is
1.1-1.5x slower, ``bench_gaussian_fill.py``): every exact sampler here needs a fresh uniform
direction per row, i.e. d Gaussians, so no exact vMF/mixture/Langevin row can be cheaper than that.

Every rate is measured in several interleaved rounds and every round is kept (min/median/max), as rows
per wall second and rows per CPU second of the process (``time.process_time``: it counts our own
threads, spinning ones included, and not other processes, so on a shared machine it is the steadier
figure); the load average is recorded with each section. One torch thread, in line (no prefetch).

Sections:
  kernels   per d: limit (index_select of the batch into a reused buffer), floor (limit + [B, d]
            Gaussians), vmf, mixture (augmenters applied to that batch), langevin (``LangevinAugmenter``,
            span rerun) and langevin_full (same, rerun by ``coupled_full_chain`` in d dimensions), and the
            bare loops vmf_bare, mixture_bare, langevin_bare (``_bare_*`` below: numpy Beta + rejection
            loop, torch Gaussians, the full d-dimensional chain on every row), on clustered unit rows
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
from m2m.geometry.noise import HostNoise
from m2m.geometry.vmf import kappa_from_mean_resultant
from m2m.geometry.vmf import sample as vmf_sample

BATCH, K = 256, 16
SEED_PUBLISHED = 34_993      # the seed's published generative-stream rate, rows/s (docs/benchmarks.md)
GOAL = 350_000


# ---------------------------------------------------------------------------------- bare loops
# What a user would write for the same law without m2m: Wood's sampler with numpy's Beta and a
# while-loop over the rejected rows, a Gaussian direction projected off the mean, and the Langevin
# chain of the mixture energy in d dimensions on every row (no pruning, no span coordinates).

def _bare_cosine(kappa: np.ndarray, d: int, rng: np.random.Generator) -> np.ndarray:
    b = (d - 1) / (2.0 * kappa + np.sqrt(4.0 * kappa * kappa + (d - 1.0) ** 2))
    x0 = (1.0 - b) / (1.0 + b)
    c = kappa * x0 + (d - 1) * np.log(1.0 - x0 * x0)
    w = np.empty_like(kappa)
    todo = np.arange(kappa.shape[0])
    while todo.size:
        z = rng.beta((d - 1) / 2.0, (d - 1) / 2.0, todo.size)
        bt = b[todo]
        wt = (1.0 - (1.0 + bt) * z) / (1.0 - (1.0 - bt) * z)
        ok = kappa[todo] * wt + (d - 1) * np.log(1.0 - x0[todo] * wt) - c[todo] >= np.log(rng.random(todo.size))
        w[todo[ok]] = wt[ok]
        todo = todo[~ok]
    return w


def _bare_vmf(mu: torch.Tensor, kappa: np.ndarray, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    w = torch.from_numpy(_bare_cosine(kappa, mu.shape[1], rng)).to(mu.dtype).unsqueeze(1)
    v = torch.randn(mu.shape, generator=gen)
    v = v - (v * mu).sum(1, keepdim=True) * mu
    v = v / v.norm(dim=1, keepdim=True)
    return w * mu + torch.sqrt(torch.clamp(1.0 - w * w, min=0.0)) * v


def _bare_langevin(x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor, log_w: torch.Tensor, h: torch.Tensor,
                   steps: int, gen: torch.Generator) -> torch.Tensor:
    """x [B, d]; mu [B, K, d]; kappa, log_w [B, K] (log_w -inf where absent); h [B, 1]."""
    for _ in range(steps):
        s = torch.bmm(mu, x.unsqueeze(2)).squeeze(2)
        p = torch.softmax(log_w + kappa * s, dim=1)
        grad = torch.bmm((p * kappa).unsqueeze(1), mu).squeeze(1)
        xi = torch.randn(x.shape, generator=gen)
        v = h * grad + torch.sqrt(2.0 * h) * xi
        v = v - (v * x).sum(1, keepdim=True) * x
        x = x + v
        x = x / x.norm(dim=1, keepdim=True)
    return x


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
            "wall_min": min(walls), "wall_median": statistics.median(walls), "wall_max": max(walls),
            "cpu_min": min(cpus), "cpu_median": statistics.median(cpus), "cpu_max": max(cpus)}


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
    rng = np.random.default_rng(1)
    noise = torch.empty(BATCH, d)
    host = HostNoise.of(torch.Generator().manual_seed(3))

    def floor(r: torch.Tensor) -> torch.Tensor:
        batch(r)
        return host.normal_(noise)

    # the bare loops' tables: components [self, neighbours] (same label), cumulative alpha, log weights
    valid = neighbors >= 0
    if labels is not None:
        valid &= labels[np.maximum(neighbors, 0)] == labels[:, None]
    comp = torch.from_numpy(np.concatenate([np.arange(n)[:, None], np.where(valid, neighbors, 0)], 1))
    present = torch.from_numpy(np.concatenate([np.ones((n, 1), bool), valid], 1))
    weights = torch.where(present, torch.from_numpy(alpha)[comp], 0.0)
    kap_t = torch.from_numpy(kappa)
    from m2m.geometry.vmf import log_normalizer
    log_w = torch.where(present, torch.log(weights) + log_normalizer(kap_t, d)[comp], -torch.inf).float()
    kap_c = torch.where(present, kap_t[comp], 0.0).float()

    def bare_mixture(r: torch.Tensor) -> torch.Tensor:
        pick = torch.multinomial(weights[r], 1, generator=gen).squeeze(1)
        src = comp[r].gather(1, pick.unsqueeze(1)).squeeze(1)
        return _bare_vmf(gather(src), kappa[src.numpy()], rng, gen)

    def bare_langevin(r: torch.Tensor) -> torch.Tensor:
        xb = batch(r)
        mu = gather(comp[r].reshape(-1)).view(r.shape[0], -1, d)
        h = (lang.step_size / torch.clamp(kap_t[r], min=d - 1.0)).float().unsqueeze(1)
        return _bare_langevin(xb.clone(), mu, kap_c[r], log_w[r], h, lang.steps, gen)

    fns: dict[str, tuple[Callable[[torch.Tensor], Any], int]] = {
        "limit": (batch, 4 * batches),
        "floor": (floor, 2 * batches),
        "vmf": (lambda r: vaug(batch(r), r, gather, gen), batches),
        "vmf_bare": (lambda r: _bare_vmf(batch(r), kappa[r.numpy()], rng, gen), batches),
        "mixture": (lambda r: maug(batch(r), r, gather, gen), batches),
        "mixture_bare": (bare_mixture, batches),
        "langevin": (lambda r: lang(batch(r), r, gather, gen), batches),
        "langevin_full": (lambda r: full(batch(r), r, gather, gen), full_batches),
        "langevin_bare": (bare_langevin, full_batches),
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
    out = {"langevin_span_vs_full_cpu": m["langevin"] / m["langevin_full"],
           "langevin_vs_limit_cpu": m["langevin"] / m["limit"],
           "vmf_vs_limit_cpu": m["vmf"] / m["limit"], "mixture_vs_limit_cpu": m["mixture"] / m["limit"]}
    for key in ("vmf", "mixture", "langevin"):
        out[f"{key}_vs_bare_cpu"] = m[key] / m[f"{key}_bare"]
        out[f"{key}_vs_floor_cpu"] = m[key] / m["floor"]
        out[f"{key}_vs_seed_cpu"] = m[key] / SEED_PUBLISHED
    return out


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
            st["span_vs_seed"] = st["span"]["rows_per_s"] / SEED_PUBLISHED
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


def _fmt(v: dict[str, Any], kind: str) -> str:
    return f"{v[kind + '_min'] / 1e3:,.0f}/{v[kind + '_median'] / 1e3:,.0f}/{v[kind + '_max'] / 1e3:,.0f}"


def table(res: dict[str, Any]) -> str:
    """The side-by-side table: k rows/s min/median/max over repeats, per CPU second and per wall second."""
    cols = ("vmf", "vmf_bare", "mixture", "mixture_bare", "langevin", "langevin_full", "langevin_bare", "floor", "limit")
    lines = [f"augmentation, batch {BATCH}, k = {K}; k rows/s min/median/max over {res['repeats']} repeats; "
             f"goal {GOAL // 1000}k = 10x the seed's published {SEED_PUBLISHED:,} rows/s",
             f"load average at start {res['load_average_start'][0]:.1f} on {res['cpus']} CPUs"]
    for kind in ("cpu", "wall"):
        lines.append(f"per {'CPU second of the process' if kind == 'cpu' else 'wall second'}:")
        lines.append("d".rjust(5) + "".join(c.rjust(20) for c in cols) + "   load")
        for d, r in res["kernels"].items():
            lines.append(d.rjust(5) + "".join(_fmt(r[c], kind).rjust(20) for c in cols)
                         + f"  {r['load_average'][0]:5.1f}")
    lines.append("ratios at the median CPU rate (ours / bare | ours / floor | ours / seed's 34,993):")
    for d, r in res["kernels"].items():
        q = r["ratios"]
        lines.append(d.rjust(5) + "  " + "   ".join(
            f"{key} {q[key + '_vs_bare_cpu']:.2f} | {q[key + '_vs_floor_cpu']:.2f} | {q[key + '_vs_seed_cpu']:.2f}"
            for key in ("vmf", "mixture", "langevin")))
    demo_res = res.get("demo", {})
    if "inline" in demo_res:
        r = demo_res["inline"]
        lines.append("demo lake (10k digits -> 3,113 splats, d = 640), in line, k rows/CPU-s: "
                     + ", ".join(f"{c} {_fmt(r[c], 'cpu')}" for c in cols) + f"; load {r['load_average'][0]:.1f}")
    if "stream" in demo_res:
        st = demo_res["stream"]
        lines.append(f"demo generative stream (SOC + Langevin, m2m_bench.demo._stream_rate), wall rows/s: "
                     f"ours {st['span']['rows_per_s']:,.0f} | seed {SEED_PUBLISHED:,} (x{st['span_vs_seed']:.2f}) | "
                     f"full-d rerun {st['full']['rows_per_s']:,.0f} | plain stream {st['plain_rows_per_s']:,.0f}; "
                     f"load {st['load_average'][0]:.1f}")
    lines.append("command: " + res["command"])
    return "\n".join(lines)


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-stream", action="store_true", help="skip the demo stream (lake epochs)")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per rate (default 3, quick 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds, batches = (2, 20) if args.quick else (3, 60)
    rounds = args.repeats or rounds
    t0 = time.perf_counter()
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "batch": BATCH, "k": K,
                           "repeats": rounds, "seed_published_rows_per_s": SEED_PUBLISHED, "goal_rows_per_s": GOAL,
                           "cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
                           "command": "PYTHONPATH=src:benchmarks python benchmarks/bench_augment.py " + " ".join(argv or sys.argv[1:])}
    res["kernels"] = kernels((64, 256, 1024) if args.quick else (64, 128, 256, 384, 512, 640, 768, 1024), 20_000,
                             rounds, batches)
    res["threads"] = threads(rounds, batches)
    res["demo"] = demo(rounds, batches // 2, not args.no_stream)
    res["seconds"] = time.perf_counter() - t0
    res["table"] = table(res)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(json.dumps(res, indent=1) + "\n")
    sys.stdout.write(res["table"] + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
