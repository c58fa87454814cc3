"""Issue 17 acceptance: real Lightning, 2-process gloo DDP, checkpoint every N steps, crash mid-epoch,
resume with ``ckpt_path``: both ranks continue at their next unseen batch and the epoch's coverage is
exact. Lightning saves rank 0's loader state only, so rank 1 resumes from rank 0's state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lightning")

from m2m import M2MConfig, create_m2m  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
N, D = 1000, 8
sys.path.insert(0, HERE)
from ddp_resume_script import BS, CRASH_AT, EPOCHS, EVERY  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_PORT"):
        env.pop(name, None)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, os.path.join(HERE, "ddp_resume_script.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=400)


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_crash_mid_epoch_resumes_every_rank_at_its_next_unseen_batch(tmp_path):
    lake_path = str(tmp_path / "lake")
    with create_m2m(M2MConfig(path=lake_path, latent_dim=D)) as lake:
        lake.add_splats(np.random.default_rng(0).standard_normal((N, D)).astype(np.float32))
        ref = {}
        for r in range(2):  # what each rank's epochs are: the loader's order for (seed, epoch, rank, world)
            dl = lake.export_to_dataloader(batch_size=BS, columns=("id",), rank=r, world_size=2)
            for e in range(EPOCHS):
                dl.set_epoch(e)
                ref[r, e] = [b["id"].tolist() for b in dl]
        all_ids = set(lake.snapshot.ids().tolist())
    nb = -(-(N // 2) // BS)
    out = str(tmp_path)

    crash = _run([lake_path, out, "crash"], out)
    assert crash.returncode != 0 and "simulated crash" in crash.stderr, crash.stderr[-3000:]
    last = (CRASH_AT // EVERY) * EVERY  # the last checkpoint before the crash: mid-epoch 1
    ckpt = os.path.join(out, "ckpt", f"step={last}.ckpt")
    assert os.path.exists(ckpt), os.listdir(os.path.join(out, "ckpt"))
    before = {r: _records(os.path.join(out, f"crash_rank{r}.jsonl")) for r in range(2)}
    for r in range(2):  # the crashed run followed the reference
        assert [x["ids"] for x in before[r] if x["epoch"] == 0] == ref[r, 0]

    resumed = _run([lake_path, out, "resume", ckpt], out)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    in_epoch = last - nb  # batches of epoch 1 the checkpoint had trained
    seen: list[int] = []
    for r in range(2):
        after = _records(os.path.join(out, f"resume_rank{r}.jsonl"))
        assert [x["step"] for x in after] == list(range(last, EPOCHS * nb)), f"rank {r} steps after resume"
        assert all(x["epoch"] == 1 for x in after)
        assert [x["ids"] for x in after] == ref[r, 1][in_epoch:], f"rank {r} did not continue at its next unseen batch"
        head = [x["ids"] for x in before[r] if x["epoch"] == 1 and x["step"] < last]
        assert head == ref[r, 1][:in_epoch]
        seen += [i for b in head + [x["ids"] for x in after] for i in b]
    assert len(seen) == N and set(seen) == all_ids, "epoch 1's coverage across the ranks is not exact"
