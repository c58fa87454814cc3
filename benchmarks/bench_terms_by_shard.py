"""Langevin stream rate, whole-lake tables vs terms by shard, same lake, interleaved rounds."""
import sys, time, tempfile, numpy as np, torch
torch.set_num_threads(1)
from m2m import create_m2m, M2MConfig
import m2m.stream.from_lake as fl
n, d = int(sys.argv[1]), int(sys.argv[2])
g = np.random.default_rng(0)
c = g.standard_normal((200, d)).astype(np.float32)
x = c[g.integers(0, 200, n)] + 0.35 * g.standard_normal((n, d)).astype(np.float32)
scat = g.random(n) < 0.5
x[scat] = g.standard_normal((int(scat.sum()), d)).astype(np.float32)
path = sys.argv[3] if len(sys.argv) > 3 else tempfile.mkdtemp() + "/lake"
import os
fresh = not os.path.exists(path)
with create_m2m(M2MConfig(path=path, latent_dim=d, shard_bytes=4 << 20)) as lake:
    if fresh:
        lake.add_splats(torch.from_numpy(x))
        t = time.perf_counter(); lake.estimate_kappa(); print(f"estimate {time.perf_counter()-t:.1f}s shards {len(lake.manifest.shards)}", flush=True)
    res = {"whole": [], "by_shard": []}
    for r in range(3):
        for name, budget in (("whole", 1 << 40), ("by_shard", 0)):
            fl.TERMS_BYTES = budget
            dl = lake.export_to_dataloader(batch_size=256, generate_samples=True, shuffle_mode="block", seed=r)
            assert (dl.augment._terms is not None) == (name == "by_shard")
            t0, c0 = time.perf_counter(), time.process_time()
            rows = sum(len(b) for b in dl)
            res[name].append((rows / (time.perf_counter() - t0), rows / (time.process_time() - c0)))
            print(name, r, f"{res[name][-1][0]:,.0f} rows/s wall, {res[name][-1][1]:,.0f} rows/CPU-s", flush=True)
    for name, v in res.items():
        print(name, "median wall rows/s", f"{np.median([a for a, _ in v]):,.0f}", "CPU", f"{np.median([b for _, b in v]):,.0f}")
