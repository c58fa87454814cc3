"""Passes of one loader that are live at the same time (``it = iter(dl); next(it)`` kept while later
passes run, ``zip(dl, dl)``): each yields exactly its epoch, and a pass beside a live one gathers from
the warm arena when that holds the whole lake, not from disk (before: every such pass read a full
shuffle cold, 11k against 210k rows/s at 100k x 1024 with vMF)."""

from __future__ import annotations

import pytest
import torch

from m2m import M2MConfig, create_m2m
from m2m.errors import StreamError

ROWS, D, B = 3000, 24, 64


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    path = tmp_path_factory.mktemp("overlap") / "lake"
    with create_m2m(M2MConfig(path=str(path), latent_dim=D, seed=0)) as lake:
        g = torch.Generator().manual_seed(0)
        lake.add_splats(torch.randn(ROWS, D, generator=g), labels=torch.arange(ROWS) % 5)
        lake.estimate_kappa()
        yield lake


def loader(lake, **kw):
    kw.setdefault("columns", ["embedding", "label", "id"])
    kw.setdefault("shuffle", True)
    return lake.export_to_dataloader(batch_size=B, seed=3, **kw)


def epoch_batches(lake, epoch: int, **kw) -> list[dict]:
    dl = loader(lake, **kw)
    dl.set_epoch(epoch)
    out = list(dl)
    dl.close()
    return out


def same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("generate", [False, "mixture", "langevin"])
def test_a_pass_beside_a_kept_iterator_reads_the_warm_arena_and_its_epoch(lake, generate):
    dl = loader(lake, generate_samples=generate)
    it = iter(dl)                      # kept, as a user who peeked at a batch would
    first = next(it)
    arena = dl._res.arena
    assert arena is not None and arena.whole
    assert arena.wait_filled(timeout=60)
    cold = dl.stats()["bytes_cold"]
    second = list(dl)                  # epoch 1, while the first pass is still live
    assert dl.stats()["bytes_cold"] == cold, "the pass beside the live one read from disk"
    same(second, epoch_batches(lake, 1, generate_samples=generate))
    rest = [first, *it]                # the kept pass finishes its own epoch, unchanged
    same(rest, epoch_batches(lake, 0, generate_samples=generate))
    assert dl._res.arena is arena and not arena.failed and not arena._stop.is_set()  # not closed by the borrower
    dl.close()


def test_two_passes_zipped_while_the_arena_fills(lake):
    dl = loader(lake)
    pairs = list(zip(dl, dl))          # both gather (and load blocks) from one arena still filling
    same([a for a, _ in pairs], epoch_batches(lake, 0))
    same([b for _, b in pairs], epoch_batches(lake, 1))
    dl.close()


def test_a_pass_beside_a_live_one_over_a_partial_arena_reads_cold_and_is_exact(lake):
    # block shuffle with a warm budget of a few blocks: the arena is partial, not shared
    kw = dict(shuffle_mode="block", block_rows=250, warm_bytes=ROWS * D * 4 // 3)
    dl = loader(lake, **kw)
    it = iter(dl)
    first = next(it)
    assert dl._res.arena is not None and not dl._res.arena.whole
    same(list(dl), epoch_batches(lake, 1, **kw))
    same([first, *it], epoch_batches(lake, 0, **kw))
    dl.close()


def test_a_kept_pass_with_its_own_workers_and_a_pass_beside_it_are_both_exact(lake):
    kw = dict(num_workers=2, multiprocessing_context="fork", timeout=60)
    dl = loader(lake, **kw)
    dl.set_epoch(0)
    it = iter(dl)
    first = next(it)
    ref = epoch_batches(lake, 0)
    same(list(dl), ref)                # its own (non-persistent) workers
    same([first, *it], ref)
    dl.close()


def test_a_pass_whose_persistent_workers_a_newer_pass_took_raises_instead_of_ending_short(lake):
    # torch's DataLoader resets its one persistent-workers iterator for every iter(): the newer pass
    # gets the workers, and the kept one used to yield a few of the newer pass's items and stop
    kw = dict(num_workers=2, multiprocessing_context="fork", persistent_workers=True, timeout=60)
    dl = loader(lake, **kw)
    dl.set_epoch(0)
    ref = epoch_batches(lake, 0)
    it = iter(dl)
    kept = [next(it)]
    same(list(dl), ref)                # the newer pass is whole and exact
    with pytest.raises(StreamError, match="persistent workers"):
        for b in it:                   # the batches of the item it holds, then the error
            kept.append(b)
    assert len(kept) < len(ref)
    same(kept, ref[:len(kept)])
    same(list(dl), ref)                # and the loader goes on streaming whole epochs
    dl.close()


def test_a_failed_arena_is_not_lent_and_the_pass_beside_it_reads_cold(lake):
    dl = loader(lake)
    it = iter(dl)
    next(it)
    arena = dl._res.arena
    assert arena.wait_filled(timeout=60)
    arena._fill_error = OSError("simulated: a block load failed")   # as after a read that ran out of retries
    cold = dl.stats()["bytes_cold"]
    same(list(dl), epoch_batches(lake, 1))             # exact, from the files
    assert dl.stats()["bytes_cold"] > cold
    assert not arena._stop.is_set()                    # the owner's arena is the owner's to close
    with pytest.raises(StreamError):
        list(it)                                       # the owner's pass raises the arena's error
    dl.close()


def test_a_pass_that_has_all_its_batches_ends_quietly_after_a_newer_pass_took_the_workers(lake):
    kw = dict(num_workers=2, multiprocessing_context="fork", persistent_workers=True, timeout=60)
    dl = loader(lake, **kw)
    dl.set_epoch(0)
    it = iter(dl)
    got = [next(it) for _ in range(len(dl))]           # what islice(dl, len(dl)) leaves: not exhausted
    same(got, epoch_batches(lake, 0))
    assert len(list(dl)) == len(dl)
    assert next(it, None) is None                      # ends, no error: it had everything
    dl.close()
