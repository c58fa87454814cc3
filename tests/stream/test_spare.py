"""The spare core (`m2m.stream.stages.spare`): while the consumer waits for the prefetch thread, a
helper thread gathers half of the rows left; the result is the plain gather's, bit for bit."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from m2m.stream.stages import spare
from m2m.stream.stages.base import Stage, Work
from m2m.stream.stages.prefetch import Prefetcher


@pytest.fixture(autouse=True)
def small_tables_shared(monkeypatch):
    monkeypatch.setattr(spare, "MIN_TABLE_BYTES", 0)  # these tests' tables are small


def _gather_on_a_thread(src, pos, waiting, out_dtype=None):
    """spare.index_select on a fresh thread bound to a Spare (as the prefetch thread is)."""
    out = torch.empty((len(pos), *src.shape[1:]), dtype=out_dtype or src.dtype)
    helper = spare.Spare(waiting)
    box: dict = {}

    def run():
        spare.lend(helper)
        try:
            box["out"] = spare.index_select(src, pos, out)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            box["exc"] = exc
        finally:
            spare.lend(None)
            helper.close()

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return box, helper


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
@pytest.mark.parametrize("rows", [1, 100, 5000, 20_000])
def test_a_shared_gather_equals_the_plain_gather(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    src = (torch.randn(20_000, 96, generator=g) * 100).to(dtype)
    pos = torch.randint(0, len(src), (rows,), generator=g)
    box, helper = _gather_on_a_thread(src, pos, lambda: True)
    assert torch.equal(box["out"], torch.index_select(src, 0, pos))
    step = spare.PIECE_BYTES // (96 * src.element_size())
    assert helper.handed == (1 if rows >= 2 * step else 0)  # one hand-over per call, big enough ones only


def test_no_hand_over_while_the_consumer_is_busy_and_one_once_it_waits():
    src = torch.randn(50_000, 256)
    pos = torch.randint(0, len(src), (20_000,))
    box, helper = _gather_on_a_thread(src, pos, lambda: False)
    assert torch.equal(box["out"], src[pos]) and helper.handed == 0
    looks = iter([False] * 5 + [True] * 1000)  # the consumer starts waiting after 5 pieces
    box, helper = _gather_on_a_thread(src, pos, lambda: next(looks))
    assert torch.equal(box["out"], src[pos]) and helper.handed == 1


def test_a_failing_half_raises_in_the_producer():
    src = torch.randn(1000, 512)
    pos = torch.zeros(4000, dtype=torch.int64)
    pos[-1] = 10**6  # out of range in the half the helper gathers
    box, helper = _gather_on_a_thread(src, pos, lambda: True)
    assert helper.handed == 1 and isinstance(box.get("exc"), IndexError)


def test_the_prefetch_thread_shares_its_gathers_only_while_the_consumer_waits():
    src = torch.randn(60_000, 256)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(src)))

    class Gathers(Stage):
        def __init__(self):
            self.i = 0

        def __next__(self):
            if self.i == 6:
                raise StopIteration
            pos = perm[self.i * 10_000: (self.i + 1) * 10_000]
            time.sleep(0.2 if self.i < 3 else 0.0)  # items 0-2: the consumer is waiting by the gather
            out = torch.empty(len(pos), 256)
            spare.index_select(src, pos, out)
            self.i += 1
            return Work(0, self.i - 1, self.i, pos.numpy(), None, tensors={"x": out})

    pf = Prefetcher(Gathers(), capacity=1).start()
    got = [next(pf)]
    assert pf.spare is not None and pf.spare.handed == 1  # item 0 was made while the consumer waited
    time.sleep(1.0)  # a busy consumer: item 1 is made and queued meanwhile, without the helper
    assert pf.spare.handed == 1
    got += list(pf)
    pf.shutdown()
    assert [w.first for w in got] == list(range(6))
    for w in got:
        assert torch.equal(w.tensors["x"], src[torch.from_numpy(w.rows)])


def test_a_prefetcher_that_leaves_torch_alone_has_no_helper():
    class One(Stage):
        def __next__(self):
            raise StopIteration

    pf = Prefetcher(One(), capacity=1, intra_op_threads=None).start()
    assert list(pf) == [] and pf.spare is None
    pf.shutdown()


def test_the_consumer_waits_share_follows_its_recent_stalls():
    waits = spare.ConsumerWaits()
    assert waits.loader_bound() and not waits()  # a new stream counts as loader-bound; nobody waits yet
    waits.took(0.0, 1.0)  # the first item only starts the clock
    assert waits.share == 1.0
    for i in range(2, 12):  # 10 items taken without waiting: a consumer-bound stream
        waits.took(0.0, float(i))
    assert waits.share == pytest.approx(0.8 ** 10) and not waits.loader_bound()
    for i in range(12, 22):  # then 10 items each waited for 90% of the cycle
        waits.took(0.9, float(i))
    assert waits.loader_bound() and waits.share == pytest.approx(0.9 - 0.9 * 0.8 ** 10 + 0.8 ** 20)
    waits.now.set()
    assert waits()


def test_a_consumer_bound_stream_gathers_in_one_call():
    src = torch.randn(50_000, 256)
    pos = torch.randint(0, len(src), (20_000,))
    out = torch.empty(len(pos), 256)
    helper = spare.Spare(lambda: True, worth_it=lambda: False)
    spare.lend(helper)
    try:
        spare.index_select(src, pos, out)
    finally:
        spare.lend(None)
        helper.close()
    assert helper.handed == 0 and helper._thread is None and torch.equal(out, src[pos])


def test_a_table_that_fits_in_the_caches_is_not_shared(monkeypatch):
    monkeypatch.setattr(spare, "MIN_TABLE_BYTES", 64 << 20)
    src = torch.randn(50_000, 256)  # 51 MB
    pos = torch.randint(0, len(src), (20_000,))
    box, helper = _gather_on_a_thread(src, pos, lambda: True)
    assert torch.equal(box["out"], src[pos]) and helper.handed == 0
    big = torch.randn(70_000, 256)  # 72 MB
    box, helper = _gather_on_a_thread(big, pos, lambda: True)
    assert torch.equal(box["out"], big[pos]) and helper.handed == 1


def test_the_helper_runs_on_the_producers_torch_threads(monkeypatch):
    # a new thread takes torch's process-wide count, which another stream's producer may have restored
    seen = []
    monkeypatch.setattr(spare.Spare, "_serve", lambda self: seen.append(torch.get_num_threads()))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        helper = spare.Spare(lambda: True, threads=1)
        helper.hand(torch.zeros(4, 2), torch.zeros(2, dtype=torch.int64), torch.empty(2, 2))
        helper._thread.join(10)
        assert torch.get_num_threads() == 2  # the helper restored what it found when it ended
    finally:
        torch.set_num_threads(saved)
    assert seen == [1]


def test_a_helper_that_could_not_start_is_not_joined(monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    helper = spare.Spare(lambda: True)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="start new thread"):
        helper.hand(torch.zeros(4, 2), torch.zeros(2, dtype=torch.int64), torch.empty(2, 2))
    monkeypatch.undo()
    helper.close()  # no "cannot join thread before it is started"
