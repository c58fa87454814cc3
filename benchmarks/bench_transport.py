"""How fast items cross from DataLoader workers to the consumer: ours | torch's default | a memcpy.

    PYTHONPATH=src:benchmarks python benchmarks/bench_transport.py [--rows 1024] [--dim 640] [--items 400]
        [--workers 1,2] [--rounds 3] [--out FILE]

Each item is what a stream worker sends: ``rows`` x ``dim`` float32 embeddings plus four small columns
(label, id int64, weight float32, rows int64). The workers do nothing but fill the item (a constant
write over its bytes, the same in every method), so the rate is the transport's:

  torch    the item as a dict of tensors, made fresh in each worker (what a user's IterableDataset
           yields): torch moves each tensor to its own shared-memory file, the consumer fetches each
           file's descriptor from the worker and maps it
  ours     ``m2m.stream.transport``: the worker copies the item into a slot of its ring of reused
           shared buffers, the consumer maps it as views (``SlotViews``) and lets go of it
  limit    one process copying the item's bytes into a reused buffer (no worker, no message)

Items per second over ``--items`` items, best of ``--rounds`` interleaved rounds (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from m2m.stream.transport import Packed, SlotRing, SlotViews

SMALL = (("label", torch.int64), ("id", torch.int64), ("weight", torch.float32), ("rows", torch.int64))


def _fresh_item(rows: int, dim: int) -> dict[str, torch.Tensor]:
    out = {"embedding": torch.empty(rows, dim)}
    for name, dtype in SMALL:
        out[name] = torch.empty(rows, dtype=dtype)
    for t in out.values():
        t.fill_(1)
    return out


class _Items(IterableDataset[Any]):
    def __init__(self, kind: str, rows: int, dim: int, items: int) -> None:
        self.kind, self.rows, self.dim, self.items = kind, rows, dim, items

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        n = self.items // (info.num_workers if info is not None else 1)
        if self.kind == "torch":
            for _ in range(n):
                yield _fresh_item(self.rows, self.dim)
            return
        ring = SlotRing(5)
        ring.new_pass()
        item = _fresh_item(self.rows, self.dim)   # the worker's pooled outputs
        for _ in range(n):
            for t in item.values():
                t.fill_(1)
            yield ring.pack(item)


def _rate(kind: str, rows: int, dim: int, items: int, workers: int) -> float:
    if kind == "limit":
        src = _fresh_item(rows, dim)
        dst = {k: torch.empty_like(v) for k, v in src.items()}
        t0 = time.perf_counter()
        for _ in range(items):
            for t in src.values():
                t.fill_(1)
            for k, v in src.items():
                dst[k].copy_(v)
        return items / (time.perf_counter() - t0)
    dl = DataLoader(_Items(kind, rows, dim, items), batch_size=None, num_workers=workers, prefetch_factor=2)
    views = SlotViews()
    t0 = time.perf_counter()
    n = 0
    for item in dl:
        tensors = views.unpack(item) if isinstance(item, Packed) else item
        n += int(tensors["embedding"].shape[0] > 0)
        del tensors, item
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--dim", type=int, default=640)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    mb = (a.rows * a.dim * 4 + a.rows * 8 * len(SMALL)) / 2**20
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": a.rows, "dim": a.dim,
                           "item_mib": mb, "load_start": os.getloadavg()[0], "best": {}}
    cells = [("limit", 0)] + [(k, int(w)) for w in a.workers.split(",") for k in ("torch", "ours")]
    best: dict[str, float] = {}
    for _ in range(a.rounds):
        for kind, w in cells:
            key = kind if kind == "limit" else f"{kind} w={w}"
            best[key] = max(best.get(key, 0.0), _rate(kind, a.rows, a.dim, a.items, w))
    res["best"], res["load_end"] = best, os.getloadavg()[0]
    sys.stdout.write(f"items of {a.rows} x {a.dim} float32 + {len(SMALL)} small columns ({mb:.2f} MiB), "
                     f"items/s, best of {a.rounds}\n")
    for w in a.workers.split(","):
        ours, torch_ = best[f"ours w={w}"], best[f"torch w={w}"]
        sys.stdout.write(f"  {w} worker(s): ours {ours:8,.0f} | torch {torch_:8,.0f} | limit {best['limit']:8,.0f}"
                         f" | ours/torch {ours / torch_:5.2f}x | ours/limit {ours / best['limit']:5.2f}x\n")
    sys.stdout.write(f"  load average {res['load_start']:.2f} -> {res['load_end']:.2f}\n")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if math.isfinite(sum(best.values())) else 1


if __name__ == "__main__":
    raise SystemExit(main())
