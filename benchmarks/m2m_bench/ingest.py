"""Ingest benchmark: `add_splats` rows/s vs `np.save` of the same array vs raw sequential write bandwidth.

Everything is measured in one run on the same array. Our commit is durable (fsync of every shard, the
manifest and the directory), so the limit is a raw ``write`` + ``fsync`` of the same bytes; `np.save`
is shown with and without fsync.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from m2m.config import M2MConfig
from m2m.lake.fs import fsync_path

GOAL_VS_NPSAVE = 0.7


def _unit_rows(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = g.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _time(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(quick: bool = False, rows: int | None = None, dim: int = 640, reps: int = 2) -> dict[str, Any]:
    """Measure ingest throughput (rows/s) for float32 and float16 storage; best of ``reps``."""
    from m2m.api import create_m2m

    n = rows or (200_000 if quick else 1_000_000)
    x = _unit_rows(n, dim)
    tmp = Path(tempfile.mkdtemp(prefix="m2m-bench-ingest-"))
    res: dict[str, Any] = {"rows": n, "dim": dim, "bytes_f32": x.nbytes}
    try:
        best: dict[str, float] = {}

        def keep(name: str, seconds: float) -> None:
            best[name] = max(best.get(name, 0.0), n / seconds)

        for rep in range(reps):
            p = tmp / f"raw{rep}.bin"

            def raw() -> None:
                with open(p, "wb") as f:
                    f.write(memoryview(x).cast("B"))
                    f.flush()
                    os.fsync(f.fileno())

            keep("raw_write_fsync", _time(raw))
            p.unlink()
            keep("np_save", _time(lambda: np.save(tmp / "a.npy", x)))
            (tmp / "a.npy").unlink()

            def save_fsync() -> None:
                np.save(tmp / "b.npy", x)
                fsync_path(tmp / "b.npy")

            keep("np_save_fsync", _time(save_fsync))
            (tmp / "b.npy").unlink()
            for dtype in ("float32", "float16"):
                path = tmp / f"lake-{dtype}-{rep}"

                def ours() -> None:
                    with create_m2m(M2MConfig(path=path, latent_dim=dim, storage_dtype=dtype)) as lake:
                        lake.add_splats(x)

                keep(f"m2m_{dtype}", _time(ours))
                shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.update(best)
    res["ratio_vs_np_save"] = best["m2m_float32"] / best["np_save"]
    res["ratio_vs_np_save_fsync"] = best["m2m_float32"] / best["np_save_fsync"]
    res["ratio_vs_disk"] = best["m2m_float32"] / best["raw_write_fsync"]
    res["goal_vs_np_save"] = GOAL_VS_NPSAVE
    return res


def format_table(res: dict[str, Any]) -> str:
    """One side-by-side table of the ingest results."""
    mb = res["bytes_f32"] / res["rows"] / 1e6
    lines = [f"ingest: {res['rows']:,} x {res['dim']} unit vectors (rows/s; best of runs in one process)",
             f"{'measure':<34}{'rows/s':>14}{'MB/s':>10}{'vs np.save':>12}"]
    for key, label in [("m2m_float32", "m2m add_splats float32 (ours)"),
                       ("m2m_float16", "m2m add_splats float16 (ours)"),
                       ("np_save", "np.save (what a user writes)"),
                       ("np_save_fsync", "np.save + fsync"),
                       ("raw_write_fsync", "raw write + fsync (disk limit)")]:
        r = res[key]
        lines.append(f"{label:<34}{r:>14,.0f}{r * mb:>10,.0f}{r / res['np_save']:>11.2f}x")
    lines.append(f"goal: m2m float32 >= {res['goal_vs_np_save']}x np.save -> "
                 f"{res['ratio_vs_np_save']:.2f}x ({'met' if res['ratio_vs_np_save'] >= res['goal_vs_np_save'] else 'NOT met'})")
    return "\n".join(lines)


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the `m2m bench` summary table."""
    return [
        {"measure": "ingest float32 (rows/s)", "ours": res["m2m_float32"], "baseline": res["np_save"],
         "baseline_name": "np.save", "limit": res["raw_write_fsync"], "limit_name": "write+fsync"},
        {"measure": "ingest float16 (rows/s)", "ours": res["m2m_float16"], "baseline": res["np_save"],
         "baseline_name": "np.save", "limit": res["raw_write_fsync"], "limit_name": "write+fsync"},
    ]
