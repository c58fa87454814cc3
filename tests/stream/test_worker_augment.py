"""DataLoader workers of a CPU stream: they augment the batches (an augmentation with ``in_workers``),
keep their warm arena across passes when persistent, and hand out shared-memory outputs.

Before: the consumer augmented every batch in line, reading neighbour means from the files, and a
persistent worker re-read its whole share of the lake every epoch (docs/stream.md, "Augmentation in
workers"). The batches are the same wherever they are made: the conformance matrix compares every
augmentation mode with 2 forked/spawned workers against ``num_workers=0`` bit for bit; here the same
for the three augmenters at a dimension where the Langevin reruns use the span chain.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from stream_helpers import clustered_lake, make_source

from m2m.stream.loader import make_loader
from m2m.stream.stages.hot import OutputPool

N, D, BS = 600, 8, 50


class PidAugment:
    """Writes the id of the process that augmented the batch into column 0 (exact in float32)."""

    def __init__(self, in_workers: bool) -> None:
        self.in_workers = in_workers

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, gather, generator) -> torch.Tensor:
        y = x.clone()
        y[:, 0] = float(os.getpid())
        return y


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
@pytest.mark.parametrize("in_workers", [True, False])
def test_workers_augment_only_augmentations_that_declare_it(ctx, in_workers):
    dl = make_loader(make_source(N, D), batch_size=BS, columns=("embedding", "id"), num_workers=2,
                     multiprocessing_context=ctx, timeout=120, chunk_batches=2, augment=PidAugment(in_workers))
    pids = {int(v) for b in dl for v in b["embedding"][:, 0].tolist()}
    if in_workers:
        assert os.getpid() not in pids and len(pids) == 2, pids
    else:
        assert pids == {os.getpid()}


class TablesAugment:
    """Writes into column 0 the id of the process that called ``build_tables`` (-1: none did)."""

    in_workers = True

    def build_tables(self, dim, gather) -> None:
        assert dim == D and gather(torch.tensor([0, 3])).shape == (2, D)
        self.built_by = os.getpid()

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, gather, generator) -> torch.Tensor:
        y = x.clone()
        y[:, 0] = float(getattr(self, "built_by", -1))
        return y


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_forked_workers_inherit_tables_built_in_the_consumer(ctx):
    # before forking, the loader builds the augmentation's tables once in the consumer; spawned
    # workers would receive a pickled copy anyway, so nothing is built for them
    dl = make_loader(make_source(N, D), batch_size=BS, columns=("embedding", "id"), num_workers=2,
                     multiprocessing_context=ctx, timeout=120, chunk_batches=2, augment=TablesAugment())
    builders = {int(v) for b in dl for v in b["embedding"][:, 0].tolist()}
    assert builders == ({os.getpid()} if ctx == "fork" else {-1})


def test_a_gpu_stream_keeps_the_augmentation_in_the_consumer():
    from m2m.stream import pipeline as pl

    d = pl.Delivery(device=torch.device("cuda", 0), hot_mode="staged", augment=PidAugment(True), return_tensor=False,
                    prefetch=4, intra_op_threads=1, pin_batches=False, collate_fn=None, num_workers=2)
    assert not pl.augments_in_workers(d)
    d = pl.Delivery(device=torch.device("cpu"), hot_mode="cpu", augment=PidAugment(True), return_tensor=False,
                    prefetch=4, intra_op_threads=1, pin_batches=False, collate_fn=None, num_workers=2)
    assert pl.augments_in_workers(d)
    assert not pl.augments_in_workers(pl.Delivery(**{**d.__dict__, "num_workers": 0}))


@pytest.fixture(scope="module")
def geo_lake(tmp_path_factory):
    """A lake with close neighbours at d = 64 (> K + S + 1: the Langevin reruns use the span chain)."""
    return clustered_lake(str(tmp_path_factory.mktemp("wa") / "lake"), rows=1500, clusters=20, spread=0.15, seed=5)


@pytest.mark.parametrize("mode", ["vmf", "mixture", "langevin"])
def test_batches_augmented_in_workers_equal_the_inline_stream(geo_lake, mode):
    from m2m import open_lake

    with open_lake(geo_lake) as lake:
        kw = dict(batch_size=100, columns=("embedding", "id", "weight"), generate_samples=mode,
                  importance_sampling=True, seed=4)
        ref = [{k: v.clone() for k, v in b.items()} for b in lake.export_to_dataloader(**kw)]
        dl = lake.export_to_dataloader(num_workers=2, persistent_workers=True, timeout=120, chunk_batches=2, **kw)
        for epoch in range(2):
            dl.set_epoch(epoch)
            got = [{k: v.clone() for k, v in b.items()} for b in dl]
            if epoch == 0:
                assert len(got) == len(ref)
                for a, b in zip(got, ref):
                    assert all(torch.equal(a[k], b[k]) for k in a)
        assert not any(torch.equal(a["embedding"], b["embedding"]) for a, b in zip(got, ref))  # a new epoch


def test_a_persistent_worker_keeps_its_warm_arena_across_passes():
    dl = make_loader(make_source(N, D), batch_size=BS, columns=("embedding", "id"), num_workers=2,
                     persistent_workers=True, timeout=120, background_fill=False, shuffle_mode="full")
    cold = []
    for epoch in range(3):
        dl.set_epoch(epoch)
        before = dl.stats()["bytes_cold"] if epoch else 0
        assert sum(len(b["id"]) for b in dl) == N
        cold.append(dl.stats()["bytes_cold"] - before)
    assert cold[0] > 0 and cold[1:] == [0, 0], cold


def test_worker_outputs_are_made_in_shared_memory():
    pool = OutputPool(size=0, shared=True)
    t = pool.get("embedding", 7, (5,), torch.float16)
    assert t.is_shared() and t.shape == (7, 5) and t.dtype == torch.float16 and t.is_contiguous()
    t.fill_(1.5)
    assert float(t.sum()) == 1.5 * 35
    assert not OutputPool(size=0).get("embedding", 7, (5,), torch.float32).is_shared()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_kept_warm_arena_does_not_fail_every_later_pass(monkeypatch, tmp_path, workers):
    # a block load that fails once (say a remote read out of retries) fails that pass; the loader keeps
    # its arena across passes (the consumer's, or a persistent worker's), which must not re-raise the
    # old error on every later pass
    from m2m.stream.stages import warm

    flag = tmp_path / "fail"
    flag.touch()
    read = warm.WarmArena._read_block

    def flaky(self, block, slot):
        if flag.exists():
            raise OSError("disk on fire")
        return read(self, block, slot)

    monkeypatch.setattr(warm.WarmArena, "_read_block", flaky)
    kw = dict(num_workers=2, persistent_workers=True, multiprocessing_context="fork", timeout=120) if workers else {}
    dl = make_loader(make_source(N, D), batch_size=BS, columns=("embedding", "id"), shuffle_mode="full", **kw)
    with pytest.raises(Exception, match="disk on fire"):
        list(dl)
    flag.unlink()
    for _ in range(2):
        assert sorted(int(i) for b in dl for i in b["id"]) == list(range(10_000, 10_000 + N))


def test_a_mixture_of_lakes_augments_in_workers_when_every_lake_does():
    from m2m.augment.augmenter import VMFAugmenter
    from m2m.stream.mixture import MixtureAugment

    bases = np.array([0, 10])
    assert MixtureAugment([VMFAugmenter(np.full(10, 50.0)), None], bases).in_workers is True
    assert MixtureAugment([VMFAugmenter(np.full(10, 50.0)), PidAugment(False)], bases).in_workers is False


def test_an_arena_that_fails_after_its_pass_ended_is_replaced_by_the_next_pass(monkeypatch, tmp_path):
    # the background fill outlives an abandoned pass; if it then fails, the next pass starts a new arena
    import threading
    import time

    from m2m.stream.stages import warm

    armed = tmp_path / "armed"
    read = warm.WarmArena._read_block

    def slow_fill(self, block, slot):
        if threading.current_thread().name == "m2m-warm-fill":
            time.sleep(0.005)
            if armed.exists():
                raise OSError("disk on fire")
        return read(self, block, slot)

    monkeypatch.setattr(warm.WarmArena, "_read_block", slow_fill)
    n = 20_000
    dl = make_loader(make_source(n, D), batch_size=BS, columns=("id",), shuffle_mode="full", block_rows=100,
                     chunk_batches=1, prefetch=0)
    it = iter(dl)
    next(it)
    armed.touch()
    del it
    deadline = time.monotonic() + 20
    while not (dl._res.arena is not None and dl._res.arena.failed) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dl._res.arena is not None and dl._res.arena.failed
    armed.unlink()
    assert sorted(int(i) for b in dl for i in b["id"]) == list(range(10_000, 10_000 + n))
