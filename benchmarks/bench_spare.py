"""The spare core (`m2m.stream.stages.spare`) on and off, alternating, in one process: the first epoch of
a new loader (files page-cached, against the numpy memmap loop's first pass in the same round) and
steady epochs with a consumer that does nothing or a matmul per batch (``--consumer`` output columns:
0 = nothing; 16-64 make a consumer about as fast as the loader on 2 cores).

    python benchmarks/bench_spare.py [--rows 400000] [--rounds 5] [--consumer 0,16,64] [--dir DIR] [--out FILE]

"Off" sets ``spare.PIECE_BYTES`` above any item, so no gather is ever handed over; everything else is
the same code. 400k x 640 float32 + labels (1.03 GB) as in `bench_first_epoch.py`; the data is written
under ``--dir`` (kept and reused when it is there already). One torch thread in the consumer.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _first_epoch(lake_dir: Path) -> float:
    from m2m.api import open_lake

    gc.collect()
    start = time.perf_counter()
    lake = open_lake(lake_dir)
    dl = lake.export_to_dataloader(batch_size=256, columns=("embedding", "label"))
    rows = sum(len(b["label"]) for b in dl)
    rate = rows / (time.perf_counter() - start)
    dl.close()
    lake.close()
    return rate


def _steady(dl: Any, work: Any) -> float:
    rows, start = 0, time.perf_counter()
    for b in dl:
        rows += len(b["label"])
        if work is not None:
            b["embedding"] @ work
    return rows / (time.perf_counter() - start)


def run(rows: int, rounds: int, consumers: list[int], directory: Path) -> dict[str, Any]:
    import torch
    from m2m_bench.first_epoch import files_of, numpy_loop, read_all, write

    from m2m.api import open_lake
    from m2m.stream.spec import pass_chunk_batches
    from m2m.stream.stages import spare

    torch.set_num_threads(1)
    handed = [0]
    hand = spare.Spare.hand

    def counted(self: Any, *args: Any) -> None:  # hand-overs per epoch, to tell a helper unused from noise
        handed[0] += 1
        hand(self, *args)

    spare.Spare.hand = counted  # type: ignore[method-assign]
    data = directory / "float32"
    if not (data / "lake").exists():
        write(directory, rows, "float32")
    lake_files = files_of(data / "lake")
    npy = [data / "mu.npy", data / "label.npy"]
    on_bytes, off_bytes = spare.PIECE_BYTES, 1 << 62
    res: dict[str, Any] = {"rows": rows, "rounds": rounds, "first": {"on": [], "off": [], "numpy": []}}
    for r in range(rounds):
        for mode in (("on", "off") if r % 2 else ("off", "on")):
            spare.PIECE_BYTES = on_bytes if mode == "on" else off_bytes
            read_all(lake_files + npy)
            res["first"][mode].append(_first_epoch(data / "lake"))
        read_all(lake_files + npy)
        res["first"]["numpy"].append(numpy_loop(data, r))
    spare.PIECE_BYTES = on_bytes
    lake = open_lake(data / "lake")
    dl = lake.export_to_dataloader(batch_size=256, columns=("embedding", "label"))
    _steady(dl, None)
    res["items_per_epoch"] = -(-len(dl) // pass_chunk_batches(dl.spec, len(dl)))
    dl.wait_warm()
    for cols in consumers:
        work = torch.randn(640, cols) if cols else None
        out: dict[str, list[float]] = {"on": [], "off": [], "handed_on": []}
        for r in range(2 * rounds):
            for mode in (("on", "off") if r % 2 else ("off", "on")):
                spare.PIECE_BYTES = on_bytes if mode == "on" else off_bytes
                handed[0] = 0
                out[mode].append(_steady(dl, work))
                if mode == "on":
                    out["handed_on"].append(handed[0])
        res[f"steady_consumer_{cols}"] = out
    spare.PIECE_BYTES = on_bytes
    spare.Spare.hand = hand  # type: ignore[method-assign]
    dl.close()
    lake.close()
    return res


def summary(res: dict[str, Any]) -> str:
    lines = []
    first = res["first"]
    ratios = {m: [o / n for o, n in zip(first[m], first["numpy"])] for m in ("on", "off")}
    lines.append(f"first epoch, page-cached ({res['rounds']} rounds): on {statistics.median(first['on']):,.0f} | "
                 f"off {statistics.median(first['off']):,.0f} | numpy loop {statistics.median(first['numpy']):,.0f} "
                 f"rows/s; on/numpy {statistics.median(ratios['on']):.2f}x "
                 f"[{min(ratios['on']):.2f}-{max(ratios['on']):.2f}], off/numpy {statistics.median(ratios['off']):.2f}x "
                 f"[{min(ratios['off']):.2f}-{max(ratios['off']):.2f}]")
    for key, out in res.items():
        if key.startswith("steady_consumer_"):
            on, off = statistics.median(out["on"]), statistics.median(out["off"])
            lines.append(f"steady, consumer matmul {key.rsplit('_', 1)[1]:>2} cols: on {on:,.0f} | off {off:,.0f} "
                         f"rows/s; on/off {on / off:.2f}x [{min(out['on']) / max(out['off']):.2f}-"
                         f"{max(out['on']) / min(out['off']):.2f}]; hand-overs per epoch "
                         f"{statistics.median(out['handed_on']):.0f} of {res['items_per_epoch']} items")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--consumer", default="0,16,64", help="matmul output columns per batch (0: none)")
    parser.add_argument("--dir", default=None, help="where the data is written (kept; default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    consumers = [int(c) for c in args.consumer.split(",") if c]
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="m2m-bench-spare-")
    directory = Path(args.dir or tmp.name)  # type: ignore[union-attr]
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = run(args.rows, args.rounds, consumers, directory)
    with open("/proc/loadavg") as f:
        res["machine"] = {"loadavg_before": load_before, "loadavg_at_end": f.read().split()[:3],
                          "seconds": time.time() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    text = summary(res)
    sys.stdout.write(text + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
        Path(args.out).with_suffix(".txt").write_text(text + f"\n{res['machine']}\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
