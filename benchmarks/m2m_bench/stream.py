"""Stream benchmark: our loader | what users write | the physical limit, in one run and one table.

Data: ``rows`` x 640 unit vectors (float32, then float16) plus int64 labels, written once and
memory-mapped (a `Dataset` says how to write and reopen it, so a real lake can be swapped in).
Every figure is one shuffled epoch in batches of 256 with a warm page cache, except the
out-of-core run, which evicts the files from the page cache first, streams a lake >= 4x its warm
budget in a fresh process, and compares with a sequential read of the same file measured there.
Torch runs with one thread in the measuring thread; the stream sets one thread in its own.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from m2m.lake.fs import fsync_path
from m2m.stream.source import ArraySource, RowSource

DIM = 640
BATCH = 256
SHARD_BYTES = 128 << 20
GOALS = {"vs_gather_limit": 0.8, "f16_vs_f32": 1.7, "vs_tensordataset": 5.0, "ooc_vs_disk": 0.6,
         "ooc_rss_slack_mb": 150}


@dataclass(frozen=True)
class Dataset:
    """How the benchmark lake is written and reopened (``open`` must be importable by name)."""

    write: Callable[[Path, int, int, str, int], None]
    open: Callable[[Path], RowSource]


def write_npy(directory: Path, rows: int, dim: int, dtype: str, seed: int) -> None:
    """Unit vectors and labels as ``mu.npy`` / ``label.npy`` (written in chunks, fsynced)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mu = np.lib.format.open_memmap(directory / "mu.npy", mode="w+", dtype=np.dtype(dtype), shape=(rows, dim))
    step = 65_536
    for lo in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - lo), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        mu[lo:lo + len(x)] = x
    mu.flush()
    del mu
    np.save(directory / "label.npy", rng.integers(0, 1000, rows, dtype=np.int64))
    for name in ("mu.npy", "label.npy"):
        fsync_path(directory / name)


def open_npy(directory: Path) -> RowSource:
    """The files of `write_npy`, memory-mapped, in shards of ~128 MB."""
    mu = np.load(directory / "mu.npy", mmap_mode="r")
    label = np.load(directory / "label.npy", mmap_mode="r")
    shard_rows = max(1, SHARD_BYTES // (mu.shape[1] * mu.dtype.itemsize))
    return ArraySource({"mu": mu, "label": label}, shard_rows=shard_rows)


NPY = Dataset(write_npy, open_npy)


def write_lake(directory: Path, rows: int, dim: int, dtype: str, seed: int) -> None:
    """`write_npy` (the baselines read those arrays) plus the same rows ingested into an m2m lake."""
    from m2m.api import create_m2m
    from m2m.config import M2MConfig

    write_npy(directory, rows, dim, dtype, seed)
    mu = np.load(directory / "mu.npy", mmap_mode="r")
    label = np.load(directory / "label.npy", mmap_mode="r")
    with create_m2m(M2MConfig(path=directory / "lake", latent_dim=dim, storage_dtype=dtype)) as lake:
        lake.add_splats(mu, labels=label)


def open_lake_source(directory: Path) -> RowSource:
    """The lake of `write_lake`, pinned at its latest version (CRCs are checked by `m2m verify`, not here,
    so that the out-of-core run starts with an evicted page cache)."""
    from m2m.api import open_lake

    return open_lake(directory / "lake", verify_reads=False).snapshot


LAKE = Dataset(write_lake, open_lake_source)


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def evict(directory: Path) -> None:
    """Drop the directory's files from the page cache (POSIX_FADV_DONTNEED; they are clean)."""
    for path in (p for p in directory.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def sequential_read_bw(path: Path, chunk: int = 8 << 20) -> float:
    """Bytes/s of reading ``path`` front to back in 8 MiB reads."""
    buf = memoryview(bytearray(chunk))
    fd = os.open(path, os.O_RDONLY)
    total = 0
    start = time.perf_counter()
    while True:
        got = os.readv(fd, [buf])
        if got == 0:
            break
        total += got
    os.close(fd)
    return total / (time.perf_counter() - start)


def warm_page_cache(directory: Path) -> None:
    for path in (p for p in directory.rglob("*") if p.is_file()):
        sequential_read_bw(path)


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return list(perm.split(BATCH))


def gather_limit(table: torch.Tensor, labels: torch.Tensor | None, reps: int = 2) -> float:
    """Rows/s of ``index_select`` of a shuffled epoch into reused buffers (the in-RAM limit)."""
    out = torch.empty((BATCH, table.shape[1]), dtype=table.dtype)
    lab = torch.empty(BATCH, dtype=torch.int64)
    best = 0.0
    for r in range(reps):
        idx = _batches(len(table), r)
        start = time.perf_counter()
        for i in idx:
            torch.index_select(table, 0, i, out=out[: len(i)])
            if labels is not None:
                torch.index_select(labels, 0, i, out=lab[: len(i)])
        best = max(best, len(table) / (time.perf_counter() - start))
    return best


def memmap_gather_limit(mu: np.ndarray, labels: np.ndarray, reps: int = 2) -> float:
    """Rows/s of numpy fancy-index gathers from the page-cached memmap (what a careful user writes)."""
    best = 0.0
    for r in range(reps):
        idx = [i.numpy() for i in _batches(len(mu), r)]
        start = time.perf_counter()
        for i in idx:
            torch.from_numpy(mu[i])
            torch.from_numpy(labels[i])
        best = max(best, len(mu) / (time.perf_counter() - start))
    return best


def tensordataset_rate(table: torch.Tensor, labels: torch.Tensor, rows: int) -> float:
    """Rows/s of ``DataLoader(TensorDataset, batch_size=256, shuffle=True)`` over its first ``rows`` rows."""
    from torch.utils.data import DataLoader, TensorDataset

    dl = DataLoader(TensorDataset(table, labels), batch_size=BATCH, shuffle=True,
                    generator=torch.Generator().manual_seed(0))
    seen = 0
    start = time.perf_counter()
    for x, _ in dl:
        seen += len(x)
        if seen >= rows:
            break
    return seen / (time.perf_counter() - start)


def loader(source: RowSource, **kwargs: Any) -> Any:
    """Our loader over ``source`` delivering embedding + label batches."""
    from m2m.stream.loader import make_loader

    return make_loader(source, batch_size=BATCH, columns=("embedding", "label"), **kwargs)


def epoch_rate(dl: Any) -> float:
    """Rows/s of one full iteration of ``dl``."""
    seen = 0
    start = time.perf_counter()
    for batch in dl:
        seen += len(batch["label"])
    return seen / (time.perf_counter() - start)


def interleaved(rounds: int, **runs: Callable[[], float]) -> dict[str, list[float]]:
    """Run each measurement once per round, alternating, so contention hits them alike."""
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            out[name].append(fn())
    return out


def optional_peers() -> dict[str, str]:
    """Which peer loaders import here (never installed by the benchmark)."""
    notes = {}
    for name in ("lance", "litdata"):
        try:
            importlib.import_module(name)
            notes[name] = "importable (not benchmarked in this run)"
        except ImportError as exc:
            notes[name] = f"skipped: {exc}"
    return notes


def _ooc_child(args_json: str) -> None:
    """Out-of-core run in a fresh process: prints one JSON line (this is a CLI entry point)."""
    args = json.loads(args_json)
    directory = Path(args["dir"])
    module, name = args["open"].split(":")
    open_fn = getattr(importlib.import_module(module), name)
    torch.set_num_threads(1)
    evict(directory)
    disk_bw = sequential_read_bw(directory / args["file"])
    evict(directory)
    from m2m.stream.loader import make_loader

    source = open_fn(directory)
    dl = make_loader(source, batch_size=BATCH, columns=("embedding", "label"), warm_bytes=args["warm_bytes"],
                     hot_bytes=0)
    before = rss_anon_mb()
    peak = before
    seen = 0
    start = time.perf_counter()
    for i, batch in enumerate(dl):
        seen += len(batch["label"])
        if i % 64 == 0:
            peak = max(peak, rss_anon_mb())
    seconds = time.perf_counter() - start
    peak = max(peak, rss_anon_mb())
    row_bytes = source.dim * np.dtype(source.storage_dtype).itemsize + 8
    out = {"rows": seen, "seconds": seconds, "rows_per_s": seen / seconds, "bytes_per_s": seen * row_bytes / seconds,
           "disk_seq_bytes_per_s": disk_bw, "lake_bytes": source.num_rows * row_bytes,
           "warm_bytes": args["warm_bytes"], "rss_anon_mb_before": before, "rss_anon_mb_peak": peak,
           "stats": dl.stats()}
    dl.close()  # join the loader's threads before the interpreter ends (closing note of 2026-12-06)
    sys.stdout.write(json.dumps(out) + "\n")


def out_of_core(directory: Path, dataset: Dataset, warm_bytes: int) -> dict[str, Any]:
    args = {"dir": str(directory), "open": f"{dataset.open.__module__}:{dataset.open.__qualname__}",
            "warm_bytes": warm_bytes, "file": "mu.npy"}
    code = f"from m2m_bench.stream import _ooc_child; _ooc_child({json.dumps(json.dumps(args))})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"out-of-core child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, rows: int | None = None, dataset: Dataset = LAKE,
        directory: str | os.PathLike[str] | None = None, rounds: int = 3) -> dict[str, Any]:
    """Measure everything; returns the results (rows/s per round, ratios, goals, notes) as a dict.

    Ratios compare the best of ``rounds`` interleaved runs of each side (ours and its baseline
    alternate), because this machine's contention changes from second to second.
    """
    n = rows or (200_000 if quick else 1_000_000)
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="m2m-bench-stream-", dir=directory)
    root = Path(tmp.name)
    res: dict[str, Any] = {"rows": n, "dim": DIM, "batch": BATCH, "quick": quick, "rounds": rounds,
                           "peers": optional_peers()}
    lake_bytes = n * (DIM * 4 + 8)
    budget = 2 * lake_bytes
    try:
        f32_dir, f16_dir = root / "f32", root / "f16"
        dataset.write(f32_dir, n, DIM, "float32", 0)
        warm_page_cache(f32_dir)
        source = dataset.open(f32_dir)
        mu_mm = np.load(f32_dir / "mu.npy", mmap_mode="r")
        lab_mm = np.load(f32_dir / "label.npy", mmap_mode="r")
        table = torch.from_numpy(np.array(mu_mm))
        labels = torch.from_numpy(np.array(lab_mm))
        dl32 = loader(source, warm_bytes=budget, hot_bytes=0)
        t_fill = time.perf_counter()
        res["ours_f32_first_epoch"] = epoch_rate(dl32)
        dl32.wait_warm()  # steady epochs are measured on the filled arena
        res["warm_fill_seconds"] = time.perf_counter() - t_fill
        sync = loader(source, warm_bytes=budget, hot_bytes=0, prefetch=0)
        sync._res.arena = dl32._res.arena  # the same warm arena, already filled
        # the callables bind their arrays as defaults: the names are deleted below to free memory
        res["f32"] = interleaved(rounds, ram_gather=lambda t=table, y=labels: gather_limit(t, y, reps=1),
                                 memmap_gather=lambda m=mu_mm, y=lab_mm: memmap_gather_limit(m, y, reps=1),
                                 ours=lambda d=dl32: epoch_rate(d), ours_no_thread=lambda d=sync: epoch_rate(d))
        del sync
        res["tensordataset"] = tensordataset_rate(table, labels, min(n, 100_000))
        del table, labels
        gc.collect()
        res["ours_f32_mapped"] = [epoch_rate(loader(source, warm_bytes=budget, hot_bytes=0, warm_mode="cold"))]

        dataset.write(f16_dir, n, DIM, "float16", 0)
        warm_page_cache(f16_dir)
        source16 = dataset.open(f16_dir)
        table16 = torch.from_numpy(np.array(np.load(f16_dir / "mu.npy", mmap_mode="r")))
        labels16 = torch.from_numpy(np.array(np.load(f16_dir / "label.npy", mmap_mode="r")))
        dl16 = loader(source16, warm_bytes=budget, hot_bytes=0)
        res["ours_f16_first_epoch"] = epoch_rate(dl16)
        dl16.wait_warm()
        res["f16"] = interleaved(rounds, ram_gather=lambda t=table16, y=labels16: gather_limit(t, y, reps=1),
                                 ours=lambda d=dl16: epoch_rate(d), ours_f32=lambda d=dl32: epoch_rate(d))
        del table16, labels16, dl16, dl32, source16
        gc.collect()

        dl_small = loader(source, warm_bytes=budget, hot_bytes=0, huge_pages=False)
        res["ours_f32_smallpage_first_epoch"] = epoch_rate(dl_small)
        dl_small.wait_warm()
        res["ours_f32_smallpage"] = [epoch_rate(dl_small) for _ in range(2)]
        del dl_small, source, mu_mm, lab_mm
        gc.collect()  # nothing may map the files now, or the child cannot evict them

        res["out_of_core"] = out_of_core(f32_dir, dataset, max(16 << 20, lake_bytes // 5))
    finally:
        tmp.cleanup()
    res.update(summarize(res))
    return res


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Ratios (best of the interleaved rounds) against the goals."""
    f32, f16, ooc = res["f32"], res["f16"], res["out_of_core"]
    ours = max(f32["ours"])
    limit = max(max(f32["ram_gather"]), max(f32["memmap_gather"]))
    growth_mb = ooc["rss_anon_mb_peak"] - ooc["rss_anon_mb_before"]
    ratios = {
        "vs_gather_limit": ours / limit,
        "vs_ram_gather": ours / max(f32["ram_gather"]),
        "no_thread_vs_limit": max(f32["ours_no_thread"]) / limit,
        "vs_memmap_gather": ours / max(f32["memmap_gather"]),
        "f16_vs_f32": max(f16["ours"]) / max(f16["ours_f32"]),
        "f16_vs_f16_gather": max(f16["ours"]) / max(f16["ram_gather"]),
        "vs_tensordataset": ours / res["tensordataset"],
        "first_epoch_vs_steady": res["ours_f32_first_epoch"] / ours,
        "small_pages_vs_huge": max(res["ours_f32_smallpage"]) / ours,
        "ooc_vs_disk": ooc["bytes_per_s"] / ooc["disk_seq_bytes_per_s"],
        "ooc_rss_growth_over_warm_mb": growth_mb - ooc["warm_bytes"] / 2**20,
    }
    met = {
        "vs_gather_limit": ratios["vs_gather_limit"] >= GOALS["vs_gather_limit"],
        "f16_vs_f32": ratios["f16_vs_f32"] >= GOALS["f16_vs_f32"],
        "vs_tensordataset": ratios["vs_tensordataset"] >= GOALS["vs_tensordataset"],
        "ooc_vs_disk": ratios["ooc_vs_disk"] >= GOALS["ooc_vs_disk"],
        "ooc_rss": ratios["ooc_rss_growth_over_warm_mb"] <= GOALS["ooc_rss_slack_mb"],
    }
    return {"ratios": ratios, "goals_met": met}


def format_table(res: dict[str, Any]) -> str:
    """The one table: best rows/s of the interleaved rounds, and the ratio to the in-RAM gather limit."""
    f32, f16, ooc = res["f32"], res["f16"], res["out_of_core"]
    limit = max(f32["ram_gather"])
    lines = [f"stream benchmark: {res['rows']:,} x {res['dim']} rows + int64 label, batch {res['batch']}, "
             f"shuffled epochs, best of {res['rounds']} interleaved rounds",
             f"{'what':60s} {'rows/s':>12s} {'x limit':>8s}"]

    def row(name: str, rate: float) -> None:
        lines.append(f"{name:60s} {rate:12,.0f} {rate / limit:8.2f}")

    row("limit: torch.index_select from RAM into reused buffers", limit)
    row("limit: numpy gather from the page-cached memmap", max(f32["memmap_gather"]))
    row("user: DataLoader(TensorDataset, shuffle=True)", res["tensordataset"])
    row("ours f32, first epoch (mapped shards; arena fills behind)", res["ours_f32_first_epoch"])
    row("ours f32, steady epoch", max(f32["ours"]))
    row("ours f32, steady epoch, prefetch=0 (no stream thread)", max(f32["ours_no_thread"]))
    row("ours f32, mapped shards, no warm copy (first epoch)", max(res["ours_f32_mapped"]))
    row("ours f32, 4 KiB-page arena, first epoch", res["ours_f32_smallpage_first_epoch"])
    row("ours f32, arena on 4 KiB pages, steady epoch", max(res["ours_f32_smallpage"]))
    row("limit f16: torch.index_select from RAM", max(f16["ram_gather"]))
    row("ours f16 storage -> f32 batches, steady epoch", max(f16["ours"]))
    row("ours f32, steady epoch (same rounds as f16)", max(f16["ours_f32"]))
    row(f"ours out-of-core (lake {ooc['lake_bytes'] / ooc['warm_bytes']:.1f}x warm), evicted page cache",
        ooc["rows_per_s"])
    if "warm_fill_seconds" in res:
        lines.append(f"warm arena filled in the background in {res['warm_fill_seconds']:.1f} s after the loader started")
    lines.append(f"out-of-core: {ooc['bytes_per_s'] / 1e9:.2f} GB/s vs sequential read "
                 f"{ooc['disk_seq_bytes_per_s'] / 1e9:.2f} GB/s; RssAnon {ooc['rss_anon_mb_before']:.0f} MB before, "
                 f"peak {ooc['rss_anon_mb_peak']:.0f} MB, warm_bytes {ooc['warm_bytes'] / 2**20:.0f} MB")
    for name, note in res["peers"].items():
        lines.append(f"{name}: {note}")
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()))
    lines.append("goals met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in res["goals_met"].items()))
    return "\n".join(lines)


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the `m2m bench` summary table."""
    f32, f16, ooc = res["f32"], res["f16"], res["out_of_core"]
    return [
        {"measure": "shuffled stream f32 (rows/s)", "ours": max(f32["ours"]), "baseline": res["tensordataset"],
         "baseline_name": "TensorDataset+DL", "limit": max(f32["ram_gather"]), "limit_name": "RAM gather"},
        {"measure": "shuffled stream f16 storage (rows/s)", "ours": max(f16["ours"]),
         "baseline": max(f16["ours_f32"]), "baseline_name": "ours f32", "limit": max(f16["ram_gather"]),
         "limit_name": "f16 RAM gather"},
        {"measure": "out-of-core stream (MB/s)", "ours": ooc["bytes_per_s"] / 1e6, "baseline": None,
         "limit": ooc["disk_seq_bytes_per_s"] / 1e6, "limit_name": "seq. disk read"},
    ]
