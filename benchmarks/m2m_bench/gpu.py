"""CUDA benchmark (run on a GPU machine): the hot tier and on-device augmentation.

Rows/s of one shuffled epoch delivered on the GPU, in one run: ours with the lake resident in
device memory (gather on the GPU), ours with pinned staging buffers and a side copy stream, and
``torch.index_select`` on a resident device tensor (the limit); then the Langevin and vMF
augmenters on device batches. Needs no FAISS (neighbour tables are drawn from the data's clusters).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import torch

from m2m.stream.loader import make_loader
from m2m.stream.source import ArraySource

DIM, BATCH = 640, 256


def _epoch_rate(dl: Any) -> float:
    n = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in dl:
        n += b.shape[0]
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def run(quick: bool = False, rows: int | None = None) -> dict[str, Any]:
    """All figures of the GPU check as a dict (raises if CUDA is not available)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU benchmark needs CUDA")
    from m2m.augment.augmenter import LangevinAugmenter, VMFAugmenter
    from m2m_bench.langevin import _data

    n = rows or (200_000 if quick else 1_000_000)
    g = np.random.default_rng(0)
    mu = g.standard_normal((n, DIM), dtype=np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    src = ArraySource({"mu": mu, "label": g.integers(0, 1000, n)})
    res: dict[str, Any] = {"rows": n, "device": torch.cuda.get_device_name()}
    for mode in ("resident", "staged"):
        dl = make_loader(src, batch_size=BATCH, device="cuda", warm_bytes=4 * mu.nbytes, hot_bytes=4 * mu.nbytes,
                         hot_mode=mode)
        _epoch_rate(dl)
        res[f"ours_{mode}"] = max(_epoch_rate(dl) for _ in range(2))
        dl.close()
    table = torch.from_numpy(mu).cuda()
    out = torch.empty((BATCH, DIM), device="cuda")
    perm = torch.randperm(n, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, n - BATCH + 1, BATCH):
        torch.index_select(table, 0, perm[i:i + BATCH], out=out)
    torch.cuda.synchronize()
    res["limit_index_select"] = (n // BATCH * BATCH) / (time.perf_counter() - t0)

    x, neighbors, kappa = _data(100_000, 0)
    kap = np.full(len(x), kappa, np.float32)
    store = x.cuda()

    def gather(pos: torch.Tensor) -> torch.Tensor:
        return store.index_select(0, pos.to("cuda"))

    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, aug in (("langevin", LangevinAugmenter(neighbors, kap, np.ones(len(x), np.float32))),
                      ("vmf", VMFAugmenter(kap))):
        order = torch.randperm(len(x), device="cuda")
        aug(store[order[:BATCH]], order[:BATCH], gather, gen)  # build device tables
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        for i in range(0, len(x) - BATCH + 1, BATCH):
            r = order[i:i + BATCH]
            aug(store.index_select(0, r), r, gather, gen)
            done += BATCH
        torch.cuda.synchronize()
        res[f"augment_{name}"] = done / (time.perf_counter() - t0)
    return res


def format_table(res: dict[str, Any]) -> str:
    lim = res["limit_index_select"]
    lines = [f"GPU check on {res['device']}: {res['rows']:,} x {DIM} rows, batch {BATCH}, one shuffled epoch",
             f"{'what':<52}{'rows/s':>14}{'x limit':>9}"]
    for key, label in (("limit_index_select", "limit: index_select on a resident device tensor"),
                       ("ours_resident", "ours: hot tier resident on the GPU"),
                       ("ours_staged", "ours: pinned staging + side copy stream"),
                       ("augment_langevin", "LangevinAugmenter on device (100k x 640, k=16)"),
                       ("augment_vmf", "VMFAugmenter on device")):
        lines.append(f"{label:<52}{res[key]:>14,.0f}{res[key] / lim:>9.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    out = run(quick="--quick" in sys.argv)
    sys.stdout.write((json.dumps(out, indent=1) if "--json" in sys.argv else format_table(out)) + "\n")
