"""Remote-lake benchmark on a real S3 API server (moto, its own process on 127.0.0.1).

Rows, all from one run:
* raw GET: each shard object fetched whole with one ``cat_file`` (the store's bandwidth here);
* cold cache fill: the same objects through the node cache (ranged GETs, CRC32 on the fly, temp
  file + rename), sequentially, from an empty cache -- ratio to raw GET;
* cold stream: one epoch from an empty cache (downloads + prefetch + stream) -- effective MB/s;
* warm stream: epochs from a full node cache vs the same lake on local disk, same stream options,
  alternated ``--repeats`` times -- rows/s and the median ratio.

    python benchmarks/bench_remote.py [--rows 131072] [--dim 256] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np


def _moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)


def _epoch(lake, options: dict) -> tuple[float, int]:
    dl = lake.export_to_dataloader(**options)
    t0 = time.perf_counter()
    n = 0
    for b in dl:
        n += len(b)
    return time.perf_counter() - t0, n


def run(rows: int, dim: int, repeats: int, shard_bytes: int) -> dict:
    import m2m

    proc, endpoint = _moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    work = tempfile.mkdtemp(prefix="m2m-bench-remote-")
    try:
        import fsspec
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("m2m-bench")
        url = "s3://m2m-bench/lake"
        local = os.path.join(work, "local")
        x = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        for path in (url, local):
            cfg = m2m.M2MConfig(path=path, latent_dim=dim, shard_bytes=shard_bytes,
                                cache_dir=os.path.join(work, "writer-cache"), cache_bytes=1 << 20)
            with m2m.create_m2m(cfg) as lake:
                lake.add_splats(x)
                if path == url:
                    files = [(f.path, f.bytes, f.crc32) for s in lake.manifest.shards for f in s.files]
        lake_bytes = sum(b for _, b, _ in files)
        fs2, root = fsspec.core.url_to_fs(url)

        # raw GET vs cold cache fill, alternated per repeat
        from m2m.lake.cache import ShardCache

        opts = {"batch_size": 1024, "shuffle_mode": "block", "shard_affinity": True}
        raw_s, fill_s, cold = [], [], []
        for r in range(repeats):  # raw GET, cache fill and a cold stream epoch back to back each round
            t0 = time.perf_counter()
            got = sum(len(fs2.cat_file(f"{root}/{rel}")) for rel, _, _ in files)
            raw_s.append(time.perf_counter() - t0)
            assert got == lake_bytes
            cache = ShardCache(fs2, root, url, os.path.join(work, f"fill-{r}"), 1 << 40, prefetch_shards=0)
            t0 = time.perf_counter()
            for f in files:
                with cache.open(*f):
                    pass
            fill_s.append(time.perf_counter() - t0)
            cache.close()
            shutil.rmtree(cache.dir)
            # cold stream: an empty cache (downloads overlapped with the stream by prefetch)
            with m2m.open_lake(url, cache_dir=os.path.join(work, f"cold-{r}"), cache_bytes=1 << 40) as lake:
                cold.append(_epoch(lake, opts)[0])
            shutil.rmtree(os.path.join(work, f"cold-{r}"))

        # warm node cache vs local lake, same options; one warm-up epoch per handle, then timed epochs
        warm_dir = os.path.join(work, "warm")
        results: dict[str, dict[str, list[float]]] = {}
        for mode, options in (("block", opts), ("auto", {"batch_size": 1024})):
            res = {"remote": [], "local": []}
            with m2m.open_lake(url, cache_dir=warm_dir, cache_bytes=1 << 40) as rl, m2m.open_lake(local) as ll:
                for lake in (rl, ll):
                    _epoch(lake, {**options, "epoch": 0})
                for r in range(repeats):
                    for name, lake in (("remote", rl), ("local", ll)):
                        s, n = _epoch(lake, {**options, "epoch": r + 1})
                        res[name].append(n / s)
            results[mode] = res
        raw_mb = [lake_bytes / s / 1e6 for s in raw_s]
        fill_mb = [lake_bytes / s / 1e6 for s in fill_s]
        return {
            "host": platform.node(), "cpus": os.cpu_count(), "rows": rows, "dim": dim, "dtype": "float32",
            "shards": len(files), "lake_bytes": lake_bytes, "repeats": repeats, "server": "moto (python) on 127.0.0.1",
            "raw_get_MBps": raw_mb, "cache_fill_MBps": fill_mb,
            "cold_fill_over_raw_get": statistics.median(f / r for f, r in zip(fill_mb, raw_mb)),
            "cold_stream_epoch_MBps": [lake_bytes / s / 1e6 for s in cold],
            "cold_stream_over_raw_get": statistics.median(lake_bytes / c / 1e6 / r for c, r in zip(cold, raw_mb)),
            "warm": {m: {"remote_rows_per_s": v["remote"], "local_rows_per_s": v["local"],
                         "warm_over_local": statistics.median(a / b for a, b in zip(v["remote"], v["local"]))}
                     for m, v in results.items()},
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-bytes", type=int, default=8 << 20)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    res = run(args.rows, args.dim, args.repeats, args.shard_bytes)
    text = json.dumps(res, indent=1)
    sys.stdout.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
