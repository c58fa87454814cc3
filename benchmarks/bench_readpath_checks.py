"""Cost of the per-block crc32c checks on the read path alone: a 128 MB shard read in unaligned 4 MiB
ranges through `ShardFile.read_into` into a reused buffer, checks on vs off, 15 interleaved pairs.

    python benchmarks/bench_readpath_checks.py   # prints one JSON line (medians, per-pair cost, raw GB/s)

The read alone is the worst case: a stream also gathers and hands batches over, which the checks do not slow.
"""
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from m2m_bench.stream_memmap import no_block_checks

from m2m.api import create_m2m, open_lake
from m2m.config import M2MConfig
from m2m.lake.shard import ShardFile

root = Path(tempfile.mkdtemp(prefix="m2m-bench-checks-"))
rng = np.random.default_rng(0)
with create_m2m(M2MConfig(path=root/"lake", latent_dim=640)) as lake:
    lake.add_splats(rng.standard_normal((100_000, 640), dtype=np.float32))
lake = open_lake(root/"lake")
f = lake.manifest.shards[0].files[0]
path = os.path.join(root/"lake", f.path)
buf = np.ones(4 << 20, np.uint8)
mv = memoryview(buf)
def sweep():
    sf = ShardFile(path, f)
    t = time.perf_counter()
    for lo in range(0, f.bytes - (4 << 20), 4 << 20):
        sf.read_into(lo + 12345, mv)   # unaligned, like a stream block
    sf.close()
    return (f.bytes // (4 << 20)) * (4 << 20) / (time.perf_counter() - t) / 1e9
sweep()
on, off = [], []
for r in range(15):
    on.append(sweep())
    with no_block_checks():
        off.append(sweep())
cost = [1 - a / b for a, b in zip(on, off)]
print(json.dumps({"file_bytes": f.bytes, "GBps_checked": statistics.median(on), "GBps_unchecked": statistics.median(off),
                  "cost_median": statistics.median(cost), "cost_min": min(cost), "cost_max": max(cost),
                  "on": on, "off": off}))
shutil.rmtree(root)
