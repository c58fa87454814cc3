"""Augmented streams with and without DataLoader workers: rows/s of whole epochs, in one run.

    PYTHONPATH=src:benchmarks python benchmarks/bench_workers.py [--dims 384,1024] [--modes ...] [--workers 0,2]
        [--epochs 6] [--lakes DIR] [--out FILE]

For each d: a clustered lake (``bench_augment._clustered``: 200k rows at d = 384, else 100k,
kappa and neighbours persisted), then for each mode (plain, vmf, mixture, langevin) a loader with
``num_workers=0`` and one with ``num_workers=2, persistent_workers=True`` (batch 256, full shuffle,
seed 0), ``--epochs`` epochs each; the first two epochs (worker start, warm fill, tables) are left out
of the median. Wall rows/s as the training loop sees them, no model attached; the load average is
recorded. Run it against another source tree with ``PYTHONPATH=<tree>/src:benchmarks`` to compare
code versions on the same lakes (``--lakes DIR`` keeps them between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from bench_augment import _clustered

ROWS = {384: 200_000, 1024: 100_000}
MODES = ("plain", "vmf", "mixture", "langevin")


def _lake(directory: str, d: int) -> str:
    from m2m import M2MConfig, create_m2m

    path = os.path.join(directory, f"workers-{d}")
    if not os.path.exists(path):
        x, _, _ = _clustered(ROWS.get(d, 100_000), d, 0)
        with create_m2m(M2MConfig(path=path, latent_dim=d)) as lake:
            lake.add_splats(x)
            lake.estimate_kappa()
    return path


def _epochs(path: str, mode: str, workers: int, epochs: int) -> list[float]:
    from m2m import open_lake

    kw: dict[str, Any] = {"num_workers": workers, "persistent_workers": True} if workers else {}
    rates = []
    with open_lake(path) as lake:
        dl = lake.export_to_dataloader(batch_size=256, shuffle=True, seed=0,
                                       generate_samples=False if mode == "plain" else mode, **kw)
        for e in range(epochs):
            dl.set_epoch(e)
            t0, n = time.perf_counter(), 0
            for b in dl:
                n += int(b.shape[0])
            rates.append(n / (time.perf_counter() - t0))
        dl.close()
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="384,1024")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workers", default="0,2", help="worker counts to run (2: persistent workers)")
    p.add_argument("--lakes", default=None, help="where the lakes are kept (default: a temporary folder)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    directory = a.lakes or tempfile.mkdtemp(prefix="m2m-bench-workers-")
    os.makedirs(directory, exist_ok=True)
    import m2m

    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "m2m": os.path.dirname(m2m.__file__),
                           "epochs": a.epochs, "load_start": os.getloadavg()[0], "cells": []}
    for d in (int(v) for v in a.dims.split(",")):
        path = _lake(directory, d)
        for mode in a.modes.split(","):
            line = []
            for workers in (int(v) for v in a.workers.split(",")):
                rates = _epochs(path, mode, workers, a.epochs)
                steady = statistics.median(rates[2:]) if len(rates) > 2 else rates[-1]
                res["cells"].append({"d": d, "mode": mode, "workers": workers, "rates": rates, "median": steady,
                                     "load": os.getloadavg()[0]})
                line.append(f"w={workers} {steady / 1e3:7.0f}k")
            sys.stdout.write(f"d={d:5d} {mode:9s} " + " | ".join(line) + "\n")
            sys.stdout.flush()
    res["load_end"] = os.getloadavg()[0]
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
