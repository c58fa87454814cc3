"""A pass is cut into about ``PASS_ITEMS`` items when ``chunk_batches`` is left to its default.

Before: a short epoch (the demo's 3,113 rows = 13 batches) was cut into 2 items of ~4 MiB, so the
prefetch thread and the consumer mostly took turns (docs/stream.md, "Items"). Items only group the
work: the batches must not change with the item size, in line or with workers, augmented or not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from stream_helpers import clustered_lake

from m2m.stream import pipeline
from m2m.stream.spec import PASS_ITEMS, pass_chunk_batches
from m2m.stream.stages.batches import BatchStage


def _spec(lake_path: str, **kw):
    from m2m import open_lake

    with open_lake(lake_path) as lake:
        return lake.export_to_dataloader(batch_size=50, **kw).dataset.spec


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory):
    return clustered_lake(str(tmp_path_factory.mktemp("items") / "lake"), rows=700, clusters=10, spread=0.2, seed=3)


def test_the_default_item_size_is_lowered_for_short_passes(small_lake):
    spec = _spec(small_lake)
    assert not spec.chunk_fixed and spec.chunk_batches == 64  # 50 rows of ~270 bytes: the 64-batch cap
    assert pass_chunk_batches(spec, 14) == 4                   # 14 batches -> 4 items (4, 4, 4, 2)
    assert pass_chunk_batches(spec, 4 * PASS_ITEMS) == 4
    assert pass_chunk_batches(spec, 5) == 2 and pass_chunk_batches(spec, 9) == 3   # 3 items: at most a quarter
    assert pass_chunk_batches(spec, 10_000) == 64              # long passes keep the ~4 MiB items
    assert pass_chunk_batches(spec, 1) == 1 and pass_chunk_batches(spec, 0) == 1
    fixed = _spec(small_lake, chunk_batches=64)
    assert fixed.chunk_fixed and pass_chunk_batches(fixed, 14) == 64
    assert pass_chunk_batches(dataclasses.replace(spec, chunk_batches=3), 14) == 3


class _Recorder(BatchStage):
    items: list[tuple[int, int]] = []

    def __next__(self):
        work = super().__next__()
        _Recorder.items.append((work.first, work.end))
        return work


@pytest.mark.parametrize("mode", [False, "vmf", "langevin"])
def test_a_short_pass_is_cut_into_items_and_its_batches_do_not_depend_on_them(small_lake, mode, monkeypatch):
    from m2m import open_lake

    monkeypatch.setattr(pipeline, "BatchStage", _Recorder)
    kw = dict(batch_size=50, columns=("embedding", "id", "weight"), generate_samples=mode,
              importance_sampling=True, seed=7)
    runs = {}
    with open_lake(small_lake) as lake:
        for name, extra in (("default", {}), ("one item", {"chunk_batches": 64}), ("1 batch", {"chunk_batches": 1})):
            _Recorder.items = []
            runs[name] = ([{k: v.clone() for k, v in b.items()} for b in lake.export_to_dataloader(**kw, **extra)],
                          list(_Recorder.items))
    batches, items = runs["default"]
    assert len(batches) == 14
    assert len(items) >= PASS_ITEMS and items == [(0, 4), (4, 8), (8, 12), (12, 14)], items
    assert runs["one item"][1] == [(0, 14)]
    for name in ("one item", "1 batch"):
        other = runs[name][0]
        assert len(other) == len(batches)
        for a, b in zip(batches, other):
            assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_cut_the_same_items(small_lake, workers):
    from m2m import open_lake

    kw = dict(batch_size=50, columns=("embedding", "id"), generate_samples="vmf", seed=7)
    with open_lake(small_lake) as lake:
        ref = [{k: v.clone() for k, v in b.items()} for b in lake.export_to_dataloader(**kw)]
        got = [{k: v.clone() for k, v in b.items()}
               for b in lake.export_to_dataloader(num_workers=workers, timeout=120, **kw)]
    assert len(got) == len(ref) == 14
    for a, b in zip(got, ref):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_workers_keep_prefetch_batches_ready_with_the_smaller_items(small_lake):
    # the DataLoader's prefetch_factor (items per worker) follows the pass's item size: with ~4 MiB items
    # it asked for 1 item of what became 4 batches, 8 batches ready instead of the 64 asked for
    from m2m import open_lake

    with open_lake(small_lake) as lake:
        dl = lake.export_to_dataloader(batch_size=50, columns=("embedding", "id"), num_workers=2, prefetch=64,
                                       timeout=120)
        assert dl.prefetch_factor == 8                        # ceil(64 / (4 batches x 2 workers))
        assert sum(len(b["id"]) for b in dl) == 700
        fixed = lake.export_to_dataloader(batch_size=50, columns=("embedding", "id"), num_workers=2, prefetch=64,
                                          chunk_batches=64)
        # at least 2 items per worker, whatever the item size: with 1 a worker waited for the consumer to
        # take its item before it started the next (idle a third of the time, 2026-12-07)
        assert fixed.prefetch_factor == 2
