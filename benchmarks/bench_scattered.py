"""Scattered reads and overlapping passes, rows/s of the stream as a training loop sees it (no model).

    PYTHONPATH=src:benchmarks python benchmarks/bench_scattered.py [--lakes DIR] [--seconds 6] [--repeats 2]

On the 100k x 1024 clustered lake of ``bench_workers`` (built once under ``--lakes``, page-cached by the
runs before), three cases:
  mixture-partial  mixture augmentation with a 100 MiB warm budget (block shuffle, partial arena):
                   neighbour means are read from the shard files (docs/stream.md, "Scattered reads")
  mixture-ram      the same with the default budget (the lake in the warm arena), after one epoch
  plain-cold-full  a full shuffle with a 100 MiB budget: every row is a scattered cold read
  vmf-beside-kept  vMF, full shuffle in RAM, in a pass started while a peeked iterator of the same loader
                   is kept (``it = iter(dl); next(it)``), against the same pass with the iterator dropped
Run it against another source tree with ``PYTHONPATH=<tree>/src:benchmarks`` to compare code versions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench_workers import _lake


def _rate(dl, seconds: float) -> float:
    rows, t0 = 0, time.perf_counter()
    for b in dl:
        rows += int((b["embedding"] if isinstance(b, dict) else b).shape[0])
        if time.perf_counter() - t0 > seconds:
            break
    return rows / (time.perf_counter() - t0)


def case(path: str, name: str, seconds: float) -> float:
    from m2m import open_lake

    with open_lake(path) as lake:
        if name == "mixture-partial":
            dl = lake.export_to_dataloader(batch_size=256, seed=0, generate_samples="mixture", warm_bytes=100 << 20)
        elif name == "mixture-ram":     # the same stream with the lake in the warm arena, after its first epoch
            dl = lake.export_to_dataloader(batch_size=256, seed=0, generate_samples="mixture")
            for _ in dl:
                pass
            dl.wait_warm(120)
        elif name == "plain-cold-full":
            dl = lake.export_to_dataloader(batch_size=256, seed=0, shuffle_mode="full", warm_bytes=100 << 20)
        else:
            dl = lake.export_to_dataloader(batch_size=256, seed=0, generate_samples="vmf")
            it = iter(dl)
            for _ in range(200):           # into the first pass: the arena is filling or filled
                next(it)
            if name == "vmf-dropped":
                del it
            dl.wait_warm(120)
        rate = _rate(dl, seconds)
        dl.close()
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lakes", default=None)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cases", default="mixture-partial,mixture-ram,plain-cold-full,vmf-beside-kept,vmf-dropped")
    a = p.parse_args(argv)
    import m2m

    directory = a.lakes or tempfile.mkdtemp(prefix="m2m-bench-scatter-")
    path = _lake(directory, 1024)
    print(f"m2m {os.path.dirname(m2m.__file__)}  load {os.getloadavg()[0]:.1f}  {time.strftime('%Y-%m-%d %H:%M')}")
    for name in a.cases.split(","):
        rates = [case(path, name, a.seconds) for _ in range(a.repeats)]
        print(f"{name:16s} " + " ".join(f"{r / 1e3:7.1f}k" for r in rates) + " rows/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
