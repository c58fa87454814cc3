"""The Gaussian fill of an augmented batch, side by side in one run: ours | what a user would write | the limit.

    PYTHONPATH=src:benchmarks python benchmarks/bench_gaussian_fill.py [--dims 256,640,1024] [--rounds 7]
        [--out benchmarks/results/gaussian-fill-DATE.json]

Every exact vMF / mixture / Langevin row needs one uniform direction, i.e. d fresh N(0, 1) draws, so this
fill bounds the augmented streams (docs/geometry.md, "Where the time goes"). Per d, a [256, d] float32
fill into a fresh tensor (as the stream allocates it), one torch thread, rounds interleaved:

  ours           ``HostNoise.normal_``: float32 Box-Muller over raw SFC64 words (``noise.box_muller_``)
  torch          ``Tensor.normal_`` (MT19937 + torch's vectorised Box-Muller), what a user would write
  numpy          ``Generator(SFC64).standard_normal(dtype=float32, out=...)`` (Ziggurat)
  limit_words    the raw 64-bit words alone (``SFC64.random_raw``): no transform can be cheaper
  limit_write    writing the [256, d] tensor (``fill_``): the memory pass every fill makes

Times are thread CPU time (``time.thread_time``), median of the rounds; rows/s = 256 / that time.

``--augmenters``: the VMF and mixture augmenters in line (``bench_augment``'s clustered rows, 50k x d,
k = 16, batch 256 gathered from the rows), with the fill as it is (ours) and with ``HostNoise.normal_``
replaced by torch's ``normal_`` on a generator seeded from the same stream (the code before
2026-12-07), rounds interleaved (which goes first alternates); rows per CPU-second of the process, median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch

from m2m.geometry.noise import HostNoise

BATCH = 256


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()
    t0 = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - t0) / reps


def run(dims: list[int], rounds: int, reps: int = 50) -> dict[str, object]:
    torch.set_num_threads(1)
    out: dict[str, object] = {"batch": BATCH, "rounds": rounds, "reps": reps, "torch": torch.__version__,
                              "numpy": np.__version__, "load_average_start": os.getloadavg()}
    for d in dims:
        host = HostNoise.of(torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(0)
        rng = np.random.Generator(np.random.SFC64(0))
        words = np.random.SFC64(1)
        words_needed = (BATCH * d + 1) // 2
        fns: dict[str, Callable[[], object]] = {
            "ours": lambda: host.normal_(torch.empty(BATCH, d)),
            "torch": lambda: torch.empty(BATCH, d).normal_(generator=gen),
            "numpy": lambda: rng.standard_normal(out=torch.empty(BATCH, d).numpy(), dtype=np.float32),
            "limit_words": lambda: words.random_raw(words_needed),
            "limit_write": lambda: torch.empty(BATCH, d).fill_(1.0),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for key, fn in fns.items():
                times[key].append(_time(fn, reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[str(d)] = {"ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
                       "rows_per_cpu_s": {k: BATCH / t for k, t in med.items()},
                       "ours_vs_torch": med["torch"] / med["ours"], "ours_vs_numpy": med["numpy"] / med["ours"],
                       "ours_vs_limit_words": med["limit_words"] / med["ours"]}
    out["load_average_end"] = os.getloadavg()
    return out


def run_augmenters(dims: list[int], rounds: int, batches: int = 100) -> dict[str, object]:
    from bench_augment import K, _clustered

    from m2m.augment.augmenter import MixtureAugmenter, VMFAugmenter

    torch.set_num_threads(1)
    ours = HostNoise.normal_

    def torch_fill(self: HostNoise, out: torch.Tensor) -> torch.Tensor:
        gen = getattr(self, "_bench_torch", None)
        if gen is None:
            gen = self.torch_generator("cpu")
            self._bench_torch = gen  # type: ignore[attr-defined]
        return out.normal_(generator=gen)

    res: dict[str, object] = {"k": K, "batches": batches}
    try:
        for d in dims:
            x, nb, kap = _clustered(50_000, d, 0)
            n = x.shape[0]
            kappa, alpha = np.full(n, kap), np.ones(n)
            augs = {"vmf": VMFAugmenter(kappa).to("cpu"), "mixture": MixtureAugmenter(nb, kappa, alpha, None).to("cpu")}
            gen = torch.Generator().manual_seed(1)
            buf = torch.empty(BATCH, d)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(2))
            rates: dict[str, list[float]] = {}
            for i_round in range(rounds):
                fills = [("ours", ours), ("torch", torch_fill)]
                for fill_name, fill in fills if i_round % 2 == 0 else fills[::-1]:
                    HostNoise.normal_ = fill  # type: ignore[method-assign]
                    for name, aug in augs.items():
                        c0 = time.process_time()
                        for i in range(batches):
                            r = order[i * BATCH:(i + 1) * BATCH]
                            aug(torch.index_select(x, 0, r, out=buf), r, lambda p: x.index_select(0, p), gen)
                        rates.setdefault(f"{name}_{fill_name}", []).append(batches * BATCH / (time.process_time() - c0))
            med = {k: statistics.median(v) for k, v in rates.items()}
            res[str(d)] = {"rows_per_cpu_s": rates, "median": med,
                           "vmf_ours_vs_torch": med["vmf_ours"] / med["vmf_torch"],
                           "mixture_ours_vs_torch": med["mixture_ours"] / med["mixture_torch"]}
    finally:
        HostNoise.normal_ = ours  # type: ignore[method-assign]
    return res


def table(res: dict[str, object]) -> str:
    lines = ["Gaussian fill of [256, d] float32, k rows per CPU-second (median), ratios of times",
             f"{'d':>5} {'ours':>7} {'torch':>7} {'numpy':>7} {'words':>7} {'write':>7}  ours/torch ours/numpy"]
    for key, val in res.items():
        if not key.isdigit() or not isinstance(val, dict):
            continue
        r = val["rows_per_cpu_s"]
        lines.append(f"{key:>5} {r['ours'] / 1e3:7.0f} {r['torch'] / 1e3:7.0f} {r['numpy'] / 1e3:7.0f} "
                     f"{r['limit_words'] / 1e3:7.0f} {r['limit_write'] / 1e3:7.0f}  "
                     f"{val['ours_vs_torch']:9.2f}x {val['ours_vs_numpy']:9.2f}x")
    aug = res.get("augmenters")
    if isinstance(aug, dict):
        lines.append("augmenters in line, k rows per CPU-second (median): fill ours | torch's")
        for key, val in aug.items():
            if key.isdigit():
                m = val["median"]
                lines.append(f"{key:>5} vmf {m['vmf_ours'] / 1e3:5.0f} | {m['vmf_torch'] / 1e3:5.0f} "
                             f"({val['vmf_ours_vs_torch']:.2f}x)   mixture {m['mixture_ours'] / 1e3:5.0f} | "
                             f"{m['mixture_torch'] / 1e3:5.0f} ({val['mixture_ours_vs_torch']:.2f}x)")
    lines.append(f"load average {res['load_average_start']} -> {res['load_average_end']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="256,640,1024")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--augmenters", action="store_true", help="also the augmenters in line, fill ours vs torch's")
    parser.add_argument("--out", default=None, help="write the JSON results here (and the table beside it)")
    args = parser.parse_args(argv)
    dims = [int(d) for d in args.dims.split(",")]
    res = run(dims, args.rounds)
    if args.augmenters:
        res["augmenters"] = run_augmenters(dims, max(3, args.rounds // 2))
        res["load_average_end"] = os.getloadavg()
    text = table(res)
    sys.stdout.write(text + "\n")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
        with open(os.path.splitext(args.out)[0] + ".txt", "w") as fh:
            fh.write(text + "\ncommand: PYTHONPATH=src:benchmarks python benchmarks/bench_gaussian_fill.py "
                     + " ".join(argv if argv is not None else sys.argv[1:]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
