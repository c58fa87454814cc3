"""The demo's streams (SOC importance sampling, batch 256, columns embedding/label/id/weight) on the
demo's lake, rows/s of whole epochs, several repeats: the rows `m2m demo` prints, measured longer.

    PYTHONPATH=src:benchmarks python benchmarks/bench_demo_stream.py [--modes plain,vmf,mixture,langevin]
        [--seconds 2] [--repeats 3] [--workers 0] [--lake DIR] [--out FILE]

The lake (sklearn digits, 10,000 rows projected to d = 640, kappa estimated, consolidated at cosine
0.95: 3,113 splats, 13 batches an epoch) is built once under ``--lake`` (default: a temporary folder)
and reused, so that two source trees can be compared on the same lake
(``PYTHONPATH=<tree>/src:benchmarks``, alternating runs). Each repeat streams whole epochs for at least
``--seconds`` after a warm-up epoch (plan, augmenter tables, warm tier); no model is attached.
``--workers N``: N persistent DataLoader workers (the demo itself uses none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

COLUMNS = ["embedding", "label", "id", "weight"]


def _lake(directory: str) -> str:
    from m2m_bench.datasets import digits_embeddings

    from m2m import M2MConfig, create_m2m

    path = os.path.join(directory, "demo-lake")
    if not os.path.exists(path):
        data = digits_embeddings(rows=10_000, dim=640, seed=0)
        cfg = M2MConfig(path=path, latent_dim=640, seed=0)
        with create_m2m(cfg) as lake:
            lake.add_splats(data.train_x, labels=data.train_y)
            lake.estimate_kappa()
            lake.consolidate(cfg.consolidate_similarity)
    return path


def rates(path: str, mode: str, seconds: float, repeats: int, workers: int = 0) -> list[float]:
    from m2m import open_lake

    out = []
    kw: dict[str, Any] = {"num_workers": workers, "persistent_workers": True} if workers else {}
    with open_lake(path) as lake:
        dl = lake.export_to_dataloader(batch_size=256, shuffle=True, importance_sampling=True, seed=0,
                                       generate_samples=False if mode == "plain" else mode, columns=COLUMNS, **kw)
        for _ in dl:
            pass
        epoch = 1
        for _ in range(repeats):
            rows, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                dl.set_epoch(epoch)
                epoch += 1
                for b in dl:
                    rows += int(b["embedding"].shape[0])
            out.append(rows / (time.perf_counter() - t0))
        dl.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="plain,vmf,mixture,langevin")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="persistent DataLoader workers (0: none, as the demo)")
    p.add_argument("--lake", default=None, help="folder that keeps the lake between runs")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import m2m

    directory = a.lake or tempfile.mkdtemp(prefix="m2m-bench-demo-")
    os.makedirs(directory, exist_ok=True)
    path = _lake(directory)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "m2m": os.path.dirname(m2m.__file__),
                           "load_start": os.getloadavg()[0], "workers": a.workers, "modes": {}}
    for mode in a.modes.split(","):
        r = rates(path, mode, a.seconds, a.repeats, a.workers)
        res["modes"][mode] = r
        sys.stdout.write(f"{mode:9s} " + " ".join(f"{v / 1e3:6.0f}k" for v in r) + " rows/s\n")
        sys.stdout.flush()
    res["load_end"] = os.getloadavg()[0]
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
