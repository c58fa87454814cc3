"""Random-access latency: ``lake[i]``, ``lake[positions]`` and ``lake.take(ids)``, local and on S3.

    PYTHONPATH=src python benchmarks/bench_random_access.py [--rows 200000] [--dim 384]
        [--remote-rows 50000] [--shard-mb 32] [--json OUT]

Local: a lake on local disk (its files in the page cache: they were just written). Remote: the same
kind of lake on a moto S3 server (its own process on 127.0.0.1), read through the node cache:
"cold" = a fresh cache directory (the touched shard files are downloaded whole, checked, then read
positionally), "warm" = the cache already holds them. Rows:

* one row, first access of a fresh handle (opens the lake first; the handle then parses the touched
  files' Arrow metadata), and one row on a warm handle (median of 200 random positions);
* 1,000 random positions (``lake[pos]``) and 1,000 random ids (``lake.take(ids)``), median of 10;
* what a user would write without random access: ``lake.splats(ids)`` (the whole lake's ids, then
  whole memory-mapped columns gathered), median of 3 on a warm handle, and both on a fresh handle
  (there ``splats`` first checks the CRC32 of every file it touches, whole; ``take`` only the blocks);
* local again with ``verify_reads=False`` (only the rows' bytes are read, no block is checked);
* every result is checked bit-exact against the reader (``snapshot.read_all``) before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def median_ms(fn: Callable[[int], Any], repeat: int) -> float:
    out = []
    for k in range(repeat):
        t0 = time.perf_counter()
        fn(k)
        out.append(time.perf_counter() - t0)
    return round(statistics.median(out) * 1e3, 3)


def build(path: str, rows: int, dim: int, shard_bytes: int, **options: Any) -> None:
    import m2m

    rng = np.random.default_rng(0)
    cfg = m2m.M2MConfig(path=path, latent_dim=dim, shard_bytes=shard_bytes, **options)
    with m2m.create_m2m(cfg) as lake:
        step = 50_000
        for lo in range(0, rows, step):
            n = min(step, rows - lo)
            lake.add_splats(rng.standard_normal((n, dim), dtype=np.float32), labels=rng.integers(0, 100, n),
                            metadata={"source": rng.integers(0, 1000, n)})


def check_exact(lake: Any, pos: np.ndarray) -> None:
    snap = lake.snapshot
    got = lake[pos]
    for name, want in (("id", snap.read_all("id")), ("mu", snap.read_all("mu")), ("kappa", snap.read_all("kappa")),
                       ("alpha", snap.read_all("alpha")), ("label", snap.read_all("label"))):
        assert got[name].tobytes() == want[pos].tobytes(), name
    assert got["source"].tobytes() == snap.read_all("source")[pos].tobytes()
    assert lake.take(got["id"])["mu"].tobytes() == got["mu"].tobytes()


def measure(path: str, n: int, seed: int, open_options: dict[str, Any],
            fresh_options: Callable[[int], dict[str, Any]] | None = None) -> dict[str, Any]:
    from m2m import open_lake

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    firsts = []
    for k in range(5):
        opts = dict(open_options, **(fresh_options(k) if fresh_options else {}))
        t0 = time.perf_counter()
        lake = open_lake(path, **opts)
        t1 = time.perf_counter()
        lake[int(rng.integers(n))]
        t2 = time.perf_counter()
        lake.close()
        firsts.append((t1 - t0, t2 - t1))
    out["open_ms"] = round(statistics.median(f[0] for f in firsts) * 1e3, 2)
    out["first_row_ms"] = round(statistics.median(f[1] for f in firsts) * 1e3, 2)
    fresh = []
    for k in range(3):  # 1,000 ids on a fresh handle: take vs splats (which checks whole files first)
        opts = dict(open_options, **(fresh_options(100 + 2 * k) if fresh_options else {}))
        with open_lake(path, **opts) as lake:
            ids = lake.snapshot.manifest.shards[0].id_min + rng.integers(0, n, 1000)  # ids == positions here
            t0 = time.perf_counter()
            lake.take(ids)
            t1 = time.perf_counter()
        opts = dict(open_options, **(fresh_options(101 + 2 * k) if fresh_options else {}))
        with open_lake(path, **opts) as lake:
            t2 = time.perf_counter()
            lake.splats(ids)
            t3 = time.perf_counter()
        fresh.append((t1 - t0, t3 - t2))
    out["take_1000_fresh_handle_ms"] = round(statistics.median(f[0] for f in fresh) * 1e3, 2)
    out["splats_1000_fresh_handle_ms"] = round(statistics.median(f[1] for f in fresh) * 1e3, 2)
    with open_lake(path, **open_options) as lake:
        check_exact(lake, rng.integers(0, n, 1000))
        ids = lake.snapshot.ids()
        singles = rng.integers(0, n, 200)
        out["one_row_ms"] = median_ms(lambda k: lake[int(singles[k])], 200)
        sets = [rng.integers(0, n, 1000) for _ in range(10)]
        out["positions_1000_ms"] = median_ms(lambda k: lake[sets[k]], 10)
        out["take_1000_ms"] = median_ms(lambda k: lake.take(ids[sets[k]]), 10)
        out["splats_1000_ms"] = median_ms(lambda k: lake.splats(ids[sets[k]]), 3)
        out["shards"] = len(lake.manifest.shards)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--remote-rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--shard-mb", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    shard_bytes = a.shard_mb << 20
    work = tempfile.mkdtemp(prefix="m2m-bench-access-")
    results: dict[str, Any] = {}
    try:
        local = os.path.join(work, "local")
        build(local, a.rows, a.dim, shard_bytes)
        results["local"] = {"rows": a.rows, **measure(local, a.rows, 1, {})}
        print("local ", results["local"], flush=True)
        results["local_verify_reads_off"] = {"rows": a.rows, **measure(local, a.rows, 1, {"verify_reads": False})}
        print("local, verify_reads=False ", results["local_verify_reads_off"], flush=True)

        sys.path.insert(0, str(Path(__file__).parent))
        from bench_remote import _moto

        proc, endpoint = _moto()
        try:
            import s3fs

            os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir("m2m-bench")
            url = "s3://m2m-bench/lake"
            build(url, a.remote_rows, a.dim, shard_bytes, cache_dir=os.path.join(work, "writer-cache"))
            cold = measure(url, a.remote_rows, 2, {},
                           fresh_options=lambda k: {"cache_dir": os.path.join(work, f"cold-cache-{k}")})
            warm_dir = os.path.join(work, "warm-cache")
            from m2m import open_lake

            with open_lake(url, cache_dir=warm_dir) as lake:   # fill the node cache
                lake.snapshot.read_all("mu")
            warm = measure(url, a.remote_rows, 2, {"cache_dir": warm_dir})
            results["s3_cold_cache"] = {"rows": a.remote_rows, **{k: cold[k] for k in (
                "open_ms", "first_row_ms", "take_1000_fresh_handle_ms", "splats_1000_fresh_handle_ms")}}
            results["s3_warm_cache"] = {"rows": a.remote_rows, **warm}
            print("s3 cold", results["s3_cold_cache"], flush=True)
            print("s3 warm", results["s3_warm_cache"], flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        doc = {"benchmark": "random-access", "date": time.strftime("%Y-%m-%d"), "dim": a.dim, "dtype": "float32",
               "shard_bytes": shard_bytes, "columns": ["id", "mu", "kappa", "alpha", "label (int64)", "source (int64)"],
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg_1m": os.getloadavg()[0]},
               "server": "moto (python) on 127.0.0.1", "results": results}
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
