"""A real 2-process gloo DDP run: every rank yields the same number of batches; together they cover the lake."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N, D, BS = 1001, 4, 64  # 1001 rows over 2 ranks: one padding row, a short last batch


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from stream_helpers import make_source

    from m2m.stream.loader import make_loader

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dl = make_loader(make_source(N, D), batch_size=BS, columns=("id",), warm_bytes=1 << 20, hot_bytes=0)
        result = {"len": len(dl), "epochs": []}
        for epoch in range(2):
            dl.set_epoch(epoch)
            ids, batches = [], 0
            for batch in dl:
                total = torch.tensor([len(batch["id"])])
                dist.all_reduce(total)  # a collective per batch: hangs if a rank ran out early
                ids.extend(batch["id"].tolist())
                batches += 1
            result["epochs"].append({"batches": batches, "ids": ids})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_ranks_cover_the_lake_with_equal_batch_counts(tmp_path):
    start = time.perf_counter()
    init_file = str(tmp_path / "init")
    here = os.path.dirname(os.path.abspath(__file__))
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = here + (os.pathsep + old if old else "")
    try:
        mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    finally:
        os.environ["PYTHONPATH"] = old
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["len"] == results[1]["len"] == -(-(-(-N // 2)) // BS)
    for epoch in range(2):
        counts = [r["epochs"][epoch]["batches"] for r in results]
        assert counts[0] == counts[1] == results[0]["len"]
        ids = np.array(results[0]["epochs"][epoch]["ids"] + results[1]["epochs"][epoch]["ids"]) - 10_000
        assert set(ids.tolist()) == set(range(N)) and len(ids) == N + 1
        r0, r1 = results[0]["epochs"][epoch]["ids"], results[1]["epochs"][epoch]["ids"]
        assert set(r0) & set(r1) == {r1[-1]} == {r0[0]}  # the one padding row wraps to the first row
    assert results[0]["epochs"][0]["ids"] != results[0]["epochs"][1]["ids"]
    print(f"ddp run took {time.perf_counter() - start:.1f} s")
