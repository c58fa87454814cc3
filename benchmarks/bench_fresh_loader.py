"""A fresh loader per epoch against one loader over the epochs: seconds per whole epoch.

    PYTHONPATH=src:benchmarks python benchmarks/bench_fresh_loader.py [--lakes DIR] [--modes plain,mixture]

On the 100k x 1024 clustered lake of ``bench_workers`` (built once under ``--lakes``), batch 256, full
shuffle. "fresh": each epoch builds the loader, ``set_epoch(e)``, iterates, closes (every epoch pays the
first epoch's arena fill and tables again). "one": one loader, ``set_epoch(e)`` and iterate (its second
epoch pays the warm arena's huge-page collapse once, docs/stream.md "Huge pages").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from bench_workers import _lake


def epochs(path: str, mode: str, fresh: bool, n: int) -> list[float]:
    from m2m import open_lake

    gen = False if mode == "plain" else mode
    out = []
    with open_lake(path) as lake:
        dl = None
        for e in range(n):
            t = time.perf_counter()
            if dl is None or fresh:
                dl = lake.export_to_dataloader(batch_size=256, seed=0, generate_samples=gen)
            dl.set_epoch(e)
            for _ in dl:
                pass
            if fresh:
                dl.close()
            out.append(time.perf_counter() - t)
        if dl is not None:
            dl.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lakes", default=None)
    p.add_argument("--modes", default="plain,mixture")
    p.add_argument("--epochs", type=int, default=4)
    a = p.parse_args(argv)
    path = _lake(a.lakes or tempfile.mkdtemp(prefix="m2m-bench-fresh-"), 1024)
    for mode in a.modes.split(","):
        for fresh in (True, False):
            secs = epochs(path, mode, fresh, a.epochs)
            print(f"{mode:8s} {'fresh loader per epoch' if fresh else 'one loader':24s} "
                  + " ".join(f"{s:.2f}s" for s in secs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
