"""A copied loader (pickle, ``copy.deepcopy``, ``mp.spawn`` handing it to each rank, as Lightning's
``strategy="ddp_spawn"`` does) with persistent workers streams its own passes (found by a probing user on
2026-12-07: the shared numbers that tell persistent workers each pass's epoch, start and rank were the
original's: a deep copy repeated its first epoch; under mp.spawn both ranks read another rank's rows and
622 of 1,000 rows were covered)."""

from __future__ import annotations

import copy
import json
import pickle
import socket
from pathlib import Path

import pytest
import torch

from m2m import M2MConfig, create_m2m, open_lake

N, B = 600, 50


@pytest.fixture(scope="module")
def lake_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("copies") / "lake")
    with create_m2m(M2MConfig(path=path, latent_dim=8)) as lake:
        lake.add_splats(torch.randn(N, 8, generator=torch.Generator().manual_seed(0)))
    return path


def epoch_ids(dl, epoch: int) -> list[list[int]]:
    dl.set_epoch(epoch)
    return [b["id"].tolist() for b in dl]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_persistent_workers_loader_follows_its_own_epochs(lake_path, how):
    with open_lake(lake_path) as lake:
        ref = lake.export_to_dataloader(batch_size=B, columns=("id",))
        want = {e: epoch_ids(ref, e) for e in range(3)}
        dl = lake.export_to_dataloader(batch_size=B, columns=("id",), num_workers=2, persistent_workers=True,
                                       timeout=60)
        assert epoch_ids(dl, 0) == want[0]
        cp = copy.deepcopy(dl) if how == "deepcopy" else pickle.loads(pickle.dumps(dl))
        try:
            assert [epoch_ids(cp, e) for e in (1, 2)] == [want[1], want[2]]
            assert epoch_ids(dl, 1) == want[1]  # the original is not disturbed by its copy
            state = cp.state_dict()
            state.update(epoch=2, batches_yielded=5, epoch_batches=len(want[2]))
            cp.load_state_dict(state)  # a resume start reaches the copy's own workers too
            assert [b["id"].tolist() for b in cp] == want[2][5:]
        finally:
            cp.close()
            dl.close()


def _rank(rank: int, dl, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        seen = {e: [i for b in epoch_ids(dl, e) for i in b] for e in range(2)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dl.close()
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_mp_spawn_ranks_sharing_one_persistent_workers_loader_split_the_rows(lake_path, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open_lake(lake_path) as lake:
        dl = lake.export_to_dataloader(batch_size=B, columns=("id",), num_workers=2, persistent_workers=True,
                                       timeout=60)
        mp.spawn(_rank, args=(dl, port, str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for e in ("0", "1"):
        a, b = seen[0][e], seen[1][e]
        assert not set(a) & set(b) and sorted(a + b) == list(range(N)), f"epoch {e}"


def test_a_shallow_copy_does_not_take_the_originals_workers_away(lake_path):
    # (found in review) copy.copy shares the dataset: giving the copy new control numbers re-pointed the
    # original's persistent workers at numbers nothing updated
    with open_lake(lake_path) as lake:
        ref = lake.export_to_dataloader(batch_size=B, columns=("id",))
        want = {e: epoch_ids(ref, e) for e in range(3)}
        dl = lake.export_to_dataloader(batch_size=B, columns=("id",), num_workers=2, persistent_workers=True,
                                       timeout=60)
        try:
            assert epoch_ids(dl, 0) == want[0]
            cp = copy.copy(dl)
            assert epoch_ids(dl, 1) == want[1] and epoch_ids(cp, 2) == want[2] and epoch_ids(dl, 2) == want[2]
            cp.close()
        finally:
            dl.close()
