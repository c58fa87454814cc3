"""DataLoader workers' items cross in slots of a ring of shared buffers (`m2m.stream.transport`).

What must hold: a slot is reused only once nothing references the views the consumer made of it (a batch
the user keeps is never overwritten), items torch drops at the end of a pass do not keep their slots
forever, and with real workers (fork and spawn, persistent or not) the batches are those of
``num_workers=0``. The ring is the fast path: a plain loop must not fall back to fresh buffers.
"""

from __future__ import annotations

import gc
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401 - registers torch's reductions with ForkingPickler
from stream_helpers import clustered_lake

from m2m.errors import StreamError
from m2m.stream import transport
from m2m.stream.stages.hot import POOLING
from m2m.stream.transport import SlotRing, SlotViews

pytestmark = pytest.mark.skipif(not POOLING, reason="torch without storage use counts")


def _item(seed: int, rows: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embedding": torch.randn(rows, 5, generator=g), "half": torch.randn(rows, 3, generator=g).half(),
            "id": torch.randint(0, 1 << 40, (rows,), generator=g), "flag": torch.rand(rows, generator=g) > 0.5,
            "tokens": torch.randint(0, 255, (rows, 7), generator=g, dtype=torch.uint8)}


def _cross(p: transport.Packed) -> transport.Packed:
    """As the DataLoader sends it: through torch's pickler (shared storages by descriptor)."""
    return pickle.loads(ForkingPickler.dumps(p))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_items_round_trip_every_dtype_and_slots_are_reused_once_let_go():
    ring, views = SlotRing(3), SlotViews()
    for i in range(20):   # a loop that drops each item before the next: never a fresh buffer
        item = _item(i)
        got = views.unpack(_cross(ring.pack(item)))
        assert _same(got, item)
        del got
    assert ring.fresh == 0
    assert sum(b is not None for b in ring.buffers) <= 2   # one slot in use, one handed back


def test_a_kept_item_is_never_overwritten_and_the_ring_falls_back_to_fresh_buffers():
    ring, views = SlotRing(3), SlotViews()
    kept, want = [], []
    for i in range(10):   # the user keeps every batch (list(dl)): all slots stay busy
        want.append(_item(i))
        kept.append(views.unpack(_cross(ring.pack(want[-1]))))
    assert ring.fresh == 7
    assert all(_same(k, w) for k, w in zip(kept, want))
    one_view = kept[1]["id"][2:4]   # a view of a view keeps its slot too
    expected = one_view.clone()
    del kept
    gc.collect()
    for i in range(10, 16):
        assert _same(views.unpack(_cross(ring.pack(_item(i)))), _item(i))
    assert torch.equal(one_view, expected)
    assert ring.fresh == 7 + 1   # slots 0 and 2 came back; slot 1 is still held by one_view


def test_items_torch_dropped_at_the_end_of_a_pass_free_their_slots_in_the_next():
    ring, views = SlotRing(3), SlotViews()
    views.unpack(_cross(ring.pack(_item(0))))
    for i in range(1, 3):   # sent, then dropped by torch when the pass ended early: never unpacked
        ring.pack(_item(i))
    assert ring.pack(_item(3)).slot == -1   # every slot is busy as far as the worker knows
    ring.new_pass()
    for i in range(4, 12):
        assert _same(views.unpack(_cross(ring.pack(_item(i)))), _item(i))
    # the new pass's first item told the consumer what was issued; the dropped slots came back
    assert ring.fresh == 2


def test_a_larger_item_grows_its_slot_and_resends_the_buffer():
    ring, views = SlotRing(2), SlotViews()
    assert _same(views.unpack(_cross(ring.pack(_item(0, rows=4)))), _item(0, rows=4))
    big = _item(1, rows=30_000)   # more than the first buffer's 64 KiB
    p = ring.pack(big)
    assert p.buffer is not None
    assert _same(views.unpack(_cross(p)), big)
    for i in range(2, 6):
        assert _same(views.unpack(_cross(ring.pack(_item(i, rows=5)))), _item(i, rows=5))
    assert ring.fresh == 0


def test_an_item_of_a_ring_the_consumer_never_heard_of_is_an_error_not_garbage():
    ring = SlotRing(2)
    ring.pack(_item(0))   # its first item (with the ring's counters) never arrived
    with pytest.raises(StreamError, match="arrived before its first item"):
        SlotViews().unpack(_cross(ring.pack(_item(1))))


# ------------------------------------------------------------------ with real DataLoader workers
@pytest.fixture(scope="module")
def lake_path(tmp_path_factory):
    return clustered_lake(str(tmp_path_factory.mktemp("transport") / "lake"), rows=900, clusters=12, spread=0.2,
                          seed=5)


COLS = ("embedding", "label", "id", "weight")


def _reference(path, epochs, **kw):
    from m2m import open_lake

    with open_lake(path) as lake:
        dl = lake.export_to_dataloader(batch_size=40, columns=COLS, seed=3, **kw)
        out = []
        for e in range(epochs):
            dl.set_epoch(e)
            out.append([{k: v.clone() for k, v in b.items()} for b in dl])
        dl.close()
    return out


@pytest.mark.parametrize("context,persistent,mode", [("fork", True, False), ("spawn", False, "vmf"),
                                                     ("fork", False, "vmf"), ("spawn", True, False)])
def test_kept_batches_from_workers_equal_the_in_line_stream(lake_path, context, persistent, mode):
    from m2m import open_lake

    want = _reference(lake_path, 3, generate_samples=mode)
    with open_lake(lake_path) as lake:
        # one batch an item: each worker sends more items in a pass than it has slots
        dl = lake.export_to_dataloader(batch_size=40, columns=COLS, seed=3, generate_samples=mode, num_workers=2,
                                       multiprocessing_context=context, persistent_workers=persistent, timeout=120,
                                       chunk_batches=1)
        kept = []
        for e in range(3):   # every batch kept, unchanged, while the workers go on
            dl.set_epoch(e)
            kept.append(list(dl))
        stats = dl.stats()
        dl.close()
    for e in range(3):
        assert len(kept[e]) == len(want[e])
        assert all(_same(a, b) for a, b in zip(kept[e], want[e])), f"epoch {e}"
    assert stats["worker_items"] > 0 and stats["worker_fresh_items"] > 0   # the fallback was exercised


def test_a_training_loop_with_persistent_workers_keeps_to_the_ring_after_passes_left_early(lake_path):
    from m2m import open_lake

    want = _reference(lake_path, 5)
    with open_lake(lake_path) as lake:
        dl = lake.export_to_dataloader(batch_size=40, columns=COLS, seed=3, num_workers=2, persistent_workers=True,
                                       timeout=120)
        for e in range(3):   # three passes left after 2 batches: their items in flight are dropped by torch
            dl.set_epoch(e)
            for j, _ in enumerate(dl):
                if j == 1:
                    break
        for e in (3, 4):
            before = dl.stats()["worker_fresh_items"]   # a pass after one left early may need a fresh item or two
            dl.set_epoch(e)
            got = []
            for b in dl:   # the loop variable is the only reference: slots come back
                got.append({k: v.clone() for k, v in b.items()})
            assert all(_same(a, b) for a, b in zip(got, want[e])) and len(got) == len(want[e])
        stats = dl.stats()
        dl.close()
    assert stats["worker_fresh_items"] == before   # the ring came back whole: none in the last pass
    assert stats["worker_items"] > 0


def test_pinned_worker_items_keep_torch_s_transport(lake_path):
    from m2m import open_lake

    want = _reference(lake_path, 1)
    with open_lake(lake_path) as lake, pytest.warns(UserWarning):
        dl = lake.export_to_dataloader(batch_size=40, columns=COLS, seed=3, num_workers=2, pin_memory=True,
                                       timeout=120)
        got = [{k: v.clone() for k, v in b.items()} for b in dl]
        stats = dl.stats()
        dl.close()
    assert all(_same(a, b) for a, b in zip(got, want[0])) and len(got) == len(want[0])
    assert stats["worker_fresh_items"] == stats["worker_items"] > 0


_REBUILT: list[int] = []


def _counting_rebuild(*args, **kw):   # module level: forked workers pickle it by reference
    import torch.multiprocessing.reductions as red

    _REBUILT.append(1)
    return red._m2m_original_rebuild(*args, **kw)


def test_an_item_maps_no_shared_memory_file_of_its_own(lake_path, monkeypatch):
    # torch sends every tensor of an item as its own shared-memory file (the rows and weights arrays too,
    # which its default converter makes tensors); with the ring only the ring's buffers and counters are
    # mapped, once per pass
    import torch.multiprocessing.reductions as red

    from m2m import open_lake

    _REBUILT.clear()
    monkeypatch.setattr(red, "_m2m_original_rebuild", red.rebuild_storage_fd, raising=False)
    monkeypatch.setattr(red, "rebuild_storage_fd", _counting_rebuild)
    with open_lake(lake_path) as lake:
        dl = lake.export_to_dataloader(batch_size=40, columns=COLS, seed=3, num_workers=2, persistent_workers=True,
                                       multiprocessing_context="fork", chunk_batches=1, timeout=120)
        for e in range(3):
            dl.set_epoch(e)
            for _ in dl:
                pass
        stats = dl.stats()
        dl.close()
    assert stats["worker_fresh_items"] == 0
    assert stats["worker_items"] == 3 * 23
    slots = 2 + 3   # prefetch_factor + 3
    assert 0 < len(_REBUILT) <= 3 * 2 * (slots + 1)   # per pass and worker: its buffers and its counters


def _torch_shm_files() -> int:
    import os

    return sum(1 for f in os.listdir("/dev/shm") if f.startswith("torch_")) if os.path.isdir("/dev/shm") else 0


@pytest.mark.skipif(not __import__("os").path.isdir("/dev/shm"), reason="no /dev/shm")
def test_closed_persistent_workers_leave_no_ring_in_shared_memory_under_the_file_system_strategy(lake_path):
    # observed: under torch's file_system sharing strategy each dl.close() of a loader with persistent workers
    # left its workers' rings in /dev/shm until the main process exited (+6 files, 13.8 MB a close)
    import torch.multiprocessing as tmp

    from m2m import open_lake

    old = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_system")
    try:
        with open_lake(lake_path) as lake:
            dl = lake.export_to_dataloader(batch_size=40, columns=COLS, seed=3, num_workers=2, persistent_workers=True,
                                           multiprocessing_context="fork", chunk_batches=1, timeout=120)
            counts = []
            for _ in range(4):
                for _ in dl:
                    pass
                dl.close()
                gc.collect()
                counts.append(_torch_shm_files())
    finally:
        tmp.set_sharing_strategy(old)
    assert counts[-1] <= counts[0], counts
