"""Time to the first batch of the README quick start with both options on (issue 10).

``create_m2m(M2MConfig(device="cpu", latent_dim=640))``, ``add_splats(randn(rows, 640))``, then
``export_to_dataloader(batch_size=256, generate_samples=True, importance_sampling=True)`` and one
batch. The lake has no kappa/neighbours, so the loader computes them in memory (a stream never
writes); the kNN dominates (``geometry_s``). The baseline is what the seed did: persist the
geometry with ``lake.estimate_kappa()`` (a commit) and then open the same stream.
"""

from __future__ import annotations

import time
from typing import Any

import torch

DIM, BATCH = 640, 256


def _first_batch(rows: int, persist_first: bool, seed: int = 0) -> dict[str, float]:
    import m2m.stream.from_lake as export
    from m2m import M2MConfig, create_m2m

    lake = create_m2m(M2MConfig(device="cpu", latent_dim=DIM))
    try:
        lake.add_splats(torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed)))
        spent: dict[str, float] = {"geometry_s": 0.0}
        original = export.computed_geometry

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent["geometry_s"] += time.perf_counter() - t

        export.computed_geometry = timed  # type: ignore[assignment]
        try:
            t0 = time.perf_counter()
            if persist_first:
                t = time.perf_counter()
                lake.estimate_kappa()
                spent["geometry_s"] += time.perf_counter() - t
            dl = lake.export_to_dataloader(batch_size=BATCH, generate_samples=True, importance_sampling=True)
            next(iter(dl))
            total = time.perf_counter() - t0
        finally:
            export.computed_geometry = original  # type: ignore[assignment]
        dl.close()
        return {"first_batch_s": total, **spent, "version_moved": float(persist_first)}
    finally:
        lake.close()


def run(quick: bool = False, rows: int | None = None) -> dict[str, Any]:
    n = rows or (20_000 if quick else 100_000)
    ours = _first_batch(n, persist_first=False)
    seed_way = _first_batch(n, persist_first=True)
    return {"rows": n, "dim": DIM, "batch": BATCH, "ours": ours, "estimate_kappa_first": seed_way}


def format_table(res: dict[str, Any]) -> str:
    o, b = res["ours"], res["estimate_kappa_first"]
    return "\n".join([
        f"quick start to the first batch: {res['rows']:,} x {res['dim']} random, generate_samples=True, "
        "importance_sampling=True",
        f"  stream (geometry in memory, no commit): {o['first_batch_s']:.1f} s (kNN + kappa {o['geometry_s']:.1f} s)",
        f"  estimate_kappa() then stream (commit):  {b['first_batch_s']:.1f} s (kNN + kappa {b['geometry_s']:.1f} s)",
    ])


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"measure": "quick start: first batch (s)", "ours": res["ours"]["first_batch_s"],
             "baseline": res["estimate_kappa_first"]["first_batch_s"], "baseline_name": "estimate_kappa first",
             "limit": None}]
