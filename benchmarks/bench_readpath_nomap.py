"""The read path without memory maps, in one run: ours | what a user would write | the physical limit.

    python benchmarks/bench_readpath_nomap.py --mb 200 --cache hot    # and --cache cold

- ours: ``open_lake`` + ``to_arrow()`` + ``splats()`` + one stream epoch (0 workers, no shuffle), and
  each of them alone;
- user: ``pyarrow.ipc.open_file(pyarrow.memory_map(shard)).read_all()`` of every shard file, every
  column's bytes touched (a map reads nothing until touched);
- physical: the shard files' bytes read with ``readinto`` into one reused buffer.

Page cache before each timed step: ``hot`` reads every file just before; ``cold`` drops every file
with ``os.posix_fadvise(..., POSIX_FADV_DONTNEED)`` (clean pages only: nothing is dirty after the
build's fsync). Prints a table and one JSON line. Timing is never asserted anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from m2m.api import create_m2m, open_lake
from m2m.config import M2MConfig


def files_of(lake_path: Path) -> list[str]:
    with open_lake(lake_path) as lk:
        return [os.path.join(lake_path, f.path) for f in lk.manifest.files()]


def prepare(files: list[str], cache: str) -> None:
    buf = bytearray(8 << 20)
    for p in files:
        with open(p, "rb", buffering=0) as fh:
            if cache == "cold":
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while fh.readinto(buf):
                    pass


def physical(files: list[str]) -> int:
    buf = bytearray(8 << 20)
    n = 0
    for p in files:
        with open(p, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(buf)
                if not got:
                    break
                n += got
    return n


def user(files: list[str]) -> int:
    n = 0
    for p in files:
        with pa.memory_map(p) as mm:
            table = pa.ipc.open_file(mm).read_all()
            for col in table.columns:
                for chunk in col.chunks:
                    for b in chunk.buffers():
                        if b is not None and b.size:
                            n += int(np.frombuffer(b, np.uint8)[::4096].sum() >= 0) * b.size  # touch each page
    return n


def ours(lake_path: Path, what: str) -> int:
    with open_lake(lake_path) as lk:
        n = 0
        if what in ("all", "to_arrow"):
            n += lk.to_arrow().nbytes
        if what in ("all", "splats"):
            n += sum(v.nbytes for v in lk.splats().values())
        if what in ("all", "stream"):
            dl = lk.export_to_dataloader(batch_size=1024, shuffle=False, num_workers=0, columns=("id", "embedding"))
            n += sum(b["embedding"].numel() * b["embedding"].element_size() for b in dl)
        return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200, help="lake size (float32 vectors, dim 640)")
    ap.add_argument("--cache", choices=["hot", "cold"], default="hot")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="m2m-bench-nomap-"))
    try:
        rows = args.mb * (1 << 20) // (640 * 4)
        rng = np.random.default_rng(0)
        with create_m2m(M2MConfig(path=root / "lake", latent_dim=640)) as lake:
            for lo in range(0, rows, 50_000):
                lake.add_splats(rng.standard_normal((min(50_000, rows - lo), 640), dtype=np.float32))
        files = files_of(root / "lake")
        size = sum(os.path.getsize(p) for p in files)
        steps = {"ours: open+to_arrow+splats+epoch": lambda: ours(root / "lake", "all"),
                 "ours: open+to_arrow": lambda: ours(root / "lake", "to_arrow"),
                 "ours: open+splats": lambda: ours(root / "lake", "splats"),
                 "ours: open+epoch": lambda: ours(root / "lake", "stream"),
                 "user: ipc on pa.memory_map": lambda: user(files),
                 "physical: read the bytes": lambda: physical(files)}
        result: dict[str, float] = {}
        for name, fn in steps.items():
            fn()  # untimed: imports, first loader start
            times = []
            for _ in range(args.repeats):
                prepare(files, args.cache)
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            result[name] = float(np.median(times))
        print(f"lake {size / 1e6:.0f} MB in {len(files)} files, page cache {args.cache}, median of {args.repeats}")
        for name, s in result.items():
            print(f"  {name:36s} {s:8.3f} s  {size / s / 1e9:6.2f} GB/s of lake")
        print(json.dumps({"bench": "readpath_nomap", "mb": round(size / 1e6), "files": len(files),
                          "cache": args.cache, "repeats": args.repeats, "seconds": result}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
