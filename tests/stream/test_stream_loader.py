"""The loader end to end on the CPU: batches, columns, dtypes, workers, resume, hooks, samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stream_helpers import check_loader_resume, make_source
from torch.utils.data import DataLoader

from m2m.errors import ConfigError, DeviceUnavailableError, StreamError
from m2m.sampling.plan import PlanSampler
from m2m.stream import pipeline as pl
from m2m.stream.hooks import augment_seed
from m2m.stream.loader import StreamLoader, make_loader
from m2m.stream.stages.prefetch import Prefetcher
from m2m.stream.topology import World

N, D = 700, 8
KW = dict(warm_bytes=1 << 20, hot_bytes=0)
ALL = ("embedding", "id", "label", "weight", "kappa", "alpha", "neighbors")


def all_mu(source) -> np.ndarray:
    return np.concatenate([source.column(s, "mu") for s in range(len(source.shard_offsets) - 1)])


def ids_of(batches) -> np.ndarray:
    return np.concatenate([b["id"].numpy() for b in batches]) - 10_000


def test_default_batches_are_float32_tensors():
    source = make_source(N, D)
    dl = make_loader(source, batch_size=64, **KW)
    assert isinstance(dl, DataLoader) and isinstance(dl, StreamLoader)
    batches = list(dl)
    assert len(batches) == len(dl) == 11
    assert all(isinstance(b, torch.Tensor) and b.dtype == torch.float32 and b.shape[1] == D for b in batches)
    got = torch.cat(batches).numpy()
    np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(all_mu(source), axis=0))


@pytest.mark.parametrize("opts", [dict(), dict(shuffle_mode="block", block_rows=16), dict(warm_mode="cold"),
                                  dict(shuffle=False), dict(hot_mode="resident"), dict(chunk_batches=1),
                                  dict(prefetch=0)])
def test_columns_dict_matches_the_source(opts):
    source = make_source(N, D, shard_rows=150)
    dl = make_loader(source, batch_size=50, columns=ALL, **KW, **opts)
    batches = list(dl)
    rows = ids_of(batches)
    assert sorted(rows.tolist()) == list(range(N))
    mu = all_mu(source)
    nb = np.concatenate([source.column(s, "neighbors") for s in range(5)])
    for b in batches:
        r = b["id"].numpy() - 10_000
        assert set(b) == set(ALL)
        np.testing.assert_array_equal(b["embedding"].numpy(), mu[r])
        np.testing.assert_array_equal(b["neighbors"].numpy(), nb[r])
        assert b["embedding"].dtype == b["kappa"].dtype == b["weight"].dtype == torch.float32
        assert b["label"].dtype == b["id"].dtype == torch.int64
        assert torch.equal(b["weight"], torch.ones(len(r)))
    if opts.get("shuffle") is False:
        np.testing.assert_array_equal(rows, np.arange(N))


@pytest.mark.parametrize("opts", [{}, {"background_fill": False}, {"warm_mode": "cold"},
                                  {"warm_bytes": 4096, "shuffle_mode": "block", "block_rows": 50},
                                  {"background_fill": False, "block_rows": 20}])
def test_float16_storage_delivers_float32(opts):
    # whole, progressive (cold gathers of stored bytes, then converted), cold and partial arenas: the
    # arena gathers convert in pieces straight into the float32 outputs
    source = make_source(N, D, dtype=np.float16)
    dl = make_loader(source, batch_size=64, columns=("embedding", "id"), **{**KW, **opts})
    mu = all_mu(source)
    for _ in range(2):
        seen = 0
        for b in dl:
            assert b["embedding"].dtype == torch.float32
            np.testing.assert_array_equal(b["embedding"].numpy(), mu[b["id"].numpy() - 10_000].astype(np.float32))
            seen += len(b["id"])
        assert seen == N


def test_select_into_converts_in_pieces_across_the_piece_size():
    from m2m.stream.stages.warm import CONVERT_ROWS, select_into

    src = torch.randn(1000, 5).to(torch.float16)
    pos = torch.from_numpy(np.random.default_rng(0).integers(0, 1000, 2 * CONVERT_ROWS + 7))
    dst = torch.empty(len(pos), 5)
    select_into(src, pos, dst)
    assert torch.equal(dst, src[pos].float())


def test_unknown_column_names_the_valid_ones():
    source = make_source(N, D)
    with pytest.raises(ValueError, match=r"'colour'.*embedding, weight, id, label"):
        make_loader(source, batch_size=8, columns=("embedding", "colour"), **KW)
    with pytest.raises(ValueError, match="tuple of names"):
        make_loader(source, batch_size=8, columns="embedding", **KW)
    with pytest.raises(ValueError, match="at least one"):
        make_loader(source, batch_size=8, columns=(), **KW)
    with pytest.raises(ValueError, match="'label'"):
        make_loader(make_source(N, D, extra=False), batch_size=8, columns=("label",), **KW)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(batch_size=8, prefetch=-1), dict(batch_size=8, seed=-1),
                                 dict(batch_size=8, shuffle_mode="random"), dict(batch_size=8, num_workers=-1)])
def test_bad_arguments_raise_config_errors(bad):
    with pytest.raises(ConfigError):
        make_loader(make_source(50, 4), **{**KW, **bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        make_loader(make_source(50, 4), batch_size=8, device="cuda", **KW)


def test_workers_yield_the_same_batches_as_in_process():
    source = make_source(N, D, shard_rows=200)
    kw = dict(batch_size=32, columns=("embedding", "id", "label"), chunk_batches=2, **KW)
    inproc = list(make_loader(source, **kw))
    workers = list(make_loader(source, num_workers=2, **kw))
    assert len(workers) == len(inproc) == 22
    for a, b in zip(inproc, workers):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_ranks_split_an_epoch_evenly():
    source = make_source(N, D)
    loaders = [make_loader(source, batch_size=32, columns=("id",), rank=r, world_size=3, **KW) for r in range(3)]
    parts = [list(dl) for dl in loaders]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == len(loaders[0])
    rows = np.concatenate([ids_of(p) for p in parts])
    assert set(rows.tolist()) == set(range(N)) and len(rows) - N < 3


def test_epochs_advance_and_set_epoch_rewinds():
    dl = make_loader(make_source(N, D), batch_size=100, columns=("id",), **KW)
    e0, e1 = ids_of(list(dl)), ids_of(list(dl))
    assert not np.array_equal(e0, e1) and dl.epoch == 2
    dl.set_epoch(1)
    np.testing.assert_array_equal(ids_of(list(dl)), e1)
    dl.set_epoch(0)
    np.testing.assert_array_equal(ids_of(list(dl)), e0)
    fresh = make_loader(make_source(N, D), batch_size=100, columns=("id",), epoch=1, **KW)
    np.testing.assert_array_equal(ids_of(list(fresh)), e1)


def test_drop_last_keeps_whole_batches():
    dl = make_loader(make_source(N, D), batch_size=64, drop_last=True, **KW)
    batches = list(dl)
    assert len(batches) == len(dl) == N // 64 and all(len(b) == 64 for b in batches)


class Noise:
    """An augmentation that records its inputs and adds seeded noise plus the mean of two gathered rows."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, rows, gather, generator):
        self.calls.append((x.clone(), rows.clone()))
        other = gather((rows + 1) % N)
        return x + 0.01 * torch.randn(x.shape, generator=generator) + other


def test_augment_gets_the_batch_rows_and_replaces_only_embeddings():
    source = make_source(N, D, shard_rows=256)
    aug = Noise()
    dl = make_loader(source, batch_size=50, columns=("embedding", "id", "label"), augment=aug, seed=3, **KW)
    mu = torch.from_numpy(all_mu(source))
    labels = np.concatenate([source.column(s, "label") for s in range(3)])
    batches = list(dl)
    assert len(aug.calls) == len(batches)
    for j, (b, (x, rows)) in enumerate(zip(batches, aug.calls)):
        r = b["id"] - 10_000
        assert torch.equal(rows, r) and torch.equal(x, mu[r])
        gen = torch.Generator().manual_seed(augment_seed(3, 0, 0, j))
        expected = mu[r] + 0.01 * torch.randn(x.shape, generator=gen) + mu[(r + 1) % N]
        assert torch.equal(b["embedding"], expected)
        np.testing.assert_array_equal(b["label"].numpy(), labels[r.numpy()])
    with pytest.raises(ConfigError, match="augment"):
        make_loader(source, batch_size=8, columns=("id",), augment=aug, **KW)


class Plan:
    """A toy importance sampler: M draws proportional to a fixed priority, weights 1/(M p)."""

    def __init__(self, n: int, m: int, seed: int = 0) -> None:
        self.n, self.m, self.seed = n, m, seed
        self.priority = np.linspace(1.0, 2.0, n)
        self.updates: list[tuple[object, object]] = []

    def plan(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        p = self.priority / self.priority.sum()
        rows = rng.choice(self.n, size=self.m, p=p)
        return rows.astype(np.int64), (1.0 / (self.n * p[rows])).astype(np.float32)

    def update_priorities(self, ids, losses):
        self.updates.append((ids, losses))


class PlanOnly:
    def __init__(self, n: int) -> None:
        self.inner = Plan(n, n // 2)

    def plan(self, epoch: int):
        return self.inner.plan(epoch)


def test_sampler_plans_are_delivered_with_weights():
    source = make_source(N, D)
    sampler = Plan(N, 900)
    assert isinstance(sampler, PlanSampler)
    parts = [list(make_loader(source, batch_size=40, columns=("id", "weight"), sampler=sampler, rank=r,
                              world_size=2, **KW)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == -(-450 // 40)
    rows = np.concatenate([ids_of(p) for p in parts])
    weights = np.concatenate([b["weight"].numpy() for p in parts for b in p])
    plan_rows, plan_w = sampler.plan(0)
    assert sorted(zip(rows.tolist(), weights.tolist())) == sorted(zip(plan_rows.tolist(), plan_w.tolist()))
    dl = make_loader(source, batch_size=40, sampler=sampler, **KW)
    dl.update_priorities(torch.tensor([1, 2]), torch.tensor([0.5, 0.1]))
    assert len(sampler.updates) == 1
    with pytest.raises(ValueError, match="loss-based"):
        make_loader(source, batch_size=40, sampler=PlanOnly(N), **KW).update_priorities([1], [1.0])
    with pytest.raises(ValueError, match="no sampler"):
        make_loader(source, batch_size=40, **KW).update_priorities([1], [1.0])


@pytest.mark.parametrize("case", [
    dict(),
    dict(shuffle_mode="block", block_rows=32, columns=("embedding", "id")),
    dict(augment="noise", columns=("embedding", "id")),
    dict(sampler="plan", columns=("id", "weight"), drop_last=True),
    dict(num_workers=2, chunk_batches=2, columns=("embedding", "id")),
    dict(prefetch=0, augment="noise", columns=("embedding", "id")),
    dict(num_workers=2, augment="noise", columns=("embedding", "id"), shuffle_mode="block", block_rows=32),
])
def test_resume_yields_exactly_the_remaining_batches(case):
    source = make_source(N, D, shard_rows=300)
    case = dict(case)

    def make():
        kw = dict(case)
        if kw.get("augment") == "noise":
            kw["augment"] = Noise()
        if kw.get("sampler") == "plan":
            kw["sampler"] = Plan(N, 500)
        return make_loader(source, batch_size=48, seed=11, **KW, **kw)

    check_loader_resume(make, epochs=2)


def test_resume_may_change_the_number_of_workers():
    source = make_source(N, D, shard_rows=300)
    kw = dict(batch_size=32, columns=("embedding", "id"), seed=4, chunk_batches=2, **KW)
    full = list(make_loader(source, **kw))
    first = make_loader(source, **kw)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    del it
    second = make_loader(source, num_workers=2, **kw)
    second.load_state_dict(state)
    tail = list(second)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["embedding"], b["embedding"])


def test_state_must_match_the_loader():
    source = make_source(N, D)
    state = make_loader(source, batch_size=48, seed=1, **KW).state_dict()
    assert set(state) >= {"epoch", "batches_yielded", "seed", "rank", "world_size", "batch_size"}
    with pytest.raises(ValueError, match="seed"):
        make_loader(source, batch_size=48, seed=2, **KW).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        make_loader(source, batch_size=48, seed=1, **KW).load_state_dict({"epoch": 0})


def test_stats_report_rows_bytes_and_modes():
    dl = make_loader(make_source(N, D), batch_size=64, background_fill=False, **KW)
    list(dl)
    s = dl.stats()
    assert s["rows"] == N and s["batches"] == 11 and s["rows_per_s"] > 0
    assert s["bytes_warm"] == N * D * 4 and s["bytes_cold"] == N * D * 4
    assert s["hot_mode"] == "cpu" and s["warm_mode"] == "arena" and s["shuffle"] == "full"
    assert 0.0 <= s["warm_hit_rate"] <= 1.0 and s["prefetch_stall_s"] >= 0


def test_empty_source_yields_nothing():
    dl = make_loader(make_source(0, 4), batch_size=8, columns=("embedding", "id"), **KW)
    assert len(dl) == 0 and list(dl) == []


def test_background_fill_serves_the_same_batches_and_then_the_arena():
    src = make_source(N, D)
    ref = [b.clone() for e in range(3) for b in make_loader(src, batch_size=64, epoch=e, background_fill=False,
                                                              columns=None, **KW)]
    dl = make_loader(src, batch_size=64, columns=None, **KW)
    got = [b.clone() for _ in range(3) for b in dl]
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    dl._res.arena._filler.join(timeout=30)
    assert not dl.stats()["warm_filling"]
    before = dl.stats()
    list(dl)  # filled: every row now comes from the arena
    after = dl.stats()
    assert after["bytes_warm"] - before["bytes_warm"] == N * D * 4
    assert after["bytes_cold"] == before["bytes_cold"] and before["bytes_cold"] >= N * D * 4
    dl.close()


def test_background_fill_error_reaches_the_consumer(monkeypatch):
    # the fill thread and the first epoch's gathers share the loading: a failed load (on either
    # thread) reaches the consumer, with its cause chained
    from m2m.errors import StreamError
    from m2m.stream.stages import warm

    def broken_read(self, block, slot):
        raise OSError("disk on fire")

    monkeypatch.setattr(warm.WarmArena, "_read_block", broken_read)
    dl = make_loader(make_source(N, D), batch_size=64, prefetch=0, **KW)
    with pytest.raises(StreamError, match="disk on fire") as info:
        list(dl)
    assert isinstance(info.value.__cause__, OSError)
    dl.close()


def _langevin_for(source, metropolis: bool = False):
    from m2m.augment.augmenter import LangevinAugmenter

    rng = np.random.default_rng(0)
    nb = rng.integers(0, N, (N, 4)).astype(np.int64)
    return LangevinAugmenter(nb, rng.uniform(20, 60, N), np.ones(N), steps=3, step_size=0.3, metropolis=metropolis)


@pytest.mark.parametrize("kind", ["langevin", "langevin-mala", "vmf", "langevin-d32", "langevin-mala-d32"])
def test_draws_made_in_the_prefetch_thread_equal_the_inline_stream(kind):
    # prefetch > 0 on CPU: the stream thread calls augment.prepare (own chains, direction draws, path
    # checks; many rows also take the exact re-run: at d = 8 the d-dimensional chain per batch, at d = 32
    # one span chain over every batch of an item, ``rerun_ahead``); prefetch = 0 runs it in line, a batch
    # at a time
    from m2m.augment.augmenter import VMFAugmenter

    source = make_source(N, 32 if kind.endswith("d32") else D, shard_rows=256)

    def run(prefetch: int):
        aug = VMFAugmenter(np.linspace(5, 50, N)) if kind == "vmf" else _langevin_for(source, "mala" in kind)
        dl = make_loader(source, batch_size=50, columns=("embedding", "id"), augment=aug, seed=5, prefetch=prefetch,
                         **KW)
        ds = dl.dataset
        chain = pl.build(pl.INLINE, ds.source, ds.spec, dl._res, ds.rank_epoch(0, World()), 0, 0, World())
        assert pl.draws_ahead(ds.delivery) and (prefetch > 0) == isinstance(chain, Prefetcher)
        chain.shutdown()
        return [list(dl) for _ in range(2)]

    inline, ahead = run(0), run(4)
    for a_epoch, b_epoch in zip(inline, ahead):
        for a, b in zip(a_epoch, b_epoch):
            assert torch.equal(a["id"], b["id"]) and torch.equal(a["embedding"], b["embedding"])
    mu = torch.from_numpy(all_mu(source))
    moved = torch.cat([b["embedding"] for b in ahead[0]])
    assert not torch.equal(moved, mu[torch.cat([b["id"] for b in ahead[0]]) - 10_000])


def test_draw_ahead_resumes_mid_epoch():
    source = make_source(N, D, shard_rows=256)
    check_loader_resume(lambda: make_loader(source, batch_size=64, columns=("embedding", "id"),
                                            augment=_langevin_for(source), seed=2, prefetch=4, **KW))


@pytest.mark.parametrize("backlog", [0, 3])
def test_prepare_stage_draws_the_gaussians_only_while_items_wait(backlog):
    from m2m.stream.stages.base import Stage, Work
    from m2m.stream.stages.draw_ahead import PrepareAugment

    source = make_source(N, D)
    aug = _langevin_for(source)
    rows = np.arange(130, dtype=np.int64)

    class One(Stage):
        def __next__(self):
            return Work(epoch=1, first=4, end=7, rows=rows, weights=None, tensors={"_rows": torch.from_numpy(rows)})

    stage = PrepareAugment(One(), aug, 50, seed=3, rank=0, dim=D, gather=lambda p: torch.from_numpy(all_mu(source))[p],
                           backlog=lambda: backlog)
    work = next(stage)
    assert sorted(work.prepared) == [4, 5, 6]
    assert [len(d.own.t) for _, d in work.prepared.values()] == [50, 50, 30]
    assert all((d.gaussian is not None) == (backlog > 0) for _, d in work.prepared.values())
    assert stage.gaussian_items == int(backlog > 0)


BIG = dict(warm_bytes=64 << 20, hot_bytes=0)  # the whole 6 MB source fits: full shuffle, whole arena


def test_whole_arena_filled_on_small_pages_then_collapsed_after_the_pass():
    # the first epoch's fill runs on 4 KiB pages (no compaction stalls while faulting huge pages);
    # once a pass ended, a thread backs the filled arena with huge pages, keeping every byte
    from m2m.stream.memory import HUGE_PAGE

    n, d = 6000, 256  # 6 MB of mu: whole 2 MiB pages to collapse
    src = make_source(n, d)
    ref = [b.clone() for e in range(2) for b in make_loader(src, batch_size=128, epoch=e, background_fill=False,
                                                              huge_pages=False, columns=None, **BIG)]
    dl = make_loader(src, batch_size=128, columns=None, huge_pages=True, **BIG)
    first = [b.clone() for b in dl]
    arena = dl._res.arena
    assert arena._collapse and arena.complete
    assert arena.nbytes > 2 * HUGE_PAGE
    assert dl.wait_warm(timeout=60)
    assert arena.collapsed in (True, False)  # it ran (False: this kernel refused MADV_COLLAPSE)
    second = [b.clone() for b in dl]
    assert len(first) + len(second) == len(ref)
    for a, b in zip(first + second, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dl.close()
    assert not arena._collapser.is_alive()


def test_abandoned_first_pass_starts_no_collapse_and_close_stops_the_fill():
    dl = make_loader(make_source(6000, 256), batch_size=128, columns=None, huge_pages=True, **BIG)
    next(iter(dl))
    arena = dl._res.arena
    dl.close()
    assert arena._collapser is None and not arena._filler.is_alive()


@pytest.mark.parametrize("backlog", [0, 3])
def test_the_reruns_of_an_item_are_left_to_a_waiting_consumer(backlog, monkeypatch):
    # the exact reruns (one span chain per item) are made in the prefetch thread only while items wait
    # for the consumer; otherwise the consumer makes them when it takes the item (`rerun_item`), before
    # its first batch. Either way the batches equal the in-line stream's (prefetch = 0).
    import threading

    from m2m.stream.stages import draw_ahead

    source = make_source(N, 32, shard_rows=256)
    where: list[str] = []
    real = draw_ahead.rerun_item

    def recording(augment, work, batch_size, gather):
        pending = [d for _, d in (work.prepared or {}).values() if d.rerun is not None and d.exact is None]
        if pending:
            where.append(threading.current_thread().name)
        real(augment, work, batch_size, gather)
        assert all(d.rerun is None or d.exact is not None for _, d in work.prepared.values())

    monkeypatch.setattr(draw_ahead, "rerun_item", recording)
    monkeypatch.setattr(pl, "rerun_item", recording)
    monkeypatch.setattr(Prefetcher, "backlog", lambda self: backlog)

    def run(prefetch: int):
        dl = make_loader(source, batch_size=50, columns=("embedding", "id"), augment=_langevin_for(source), seed=5,
                         prefetch=prefetch, **KW)
        return list(dl)

    inline = run(0)
    where.clear()
    ahead = run(4)
    assert where and set(where) == ({"MainThread"} if backlog == 0 else {"m2m-prefetch"}), where
    for a, b in zip(inline, ahead, strict=True):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["embedding"], b["embedding"])


@pytest.mark.parametrize("backlog", [0, 3])
@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), "corrupt"])
def test_a_failing_rerun_raises_the_same_error_in_either_thread(backlog, error, monkeypatch):
    # whichever thread makes an item's reruns (above), a failure reaches the user as the prefetch
    # thread's failures do: a damaged shard as itself, anything else as StreamError with the cause chained
    from m2m.augment.augmenter import LangevinAugmenter
    from m2m.errors import CorruptShardError, StreamError

    exc = CorruptShardError("shard file x changed on disk") if error == "corrupt" else error

    def failing(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(LangevinAugmenter, "_exact", failing)
    monkeypatch.setattr(Prefetcher, "backlog", lambda self: backlog)
    source = make_source(N, 32, shard_rows=256)
    dl = make_loader(source, batch_size=50, columns=("embedding", "id"), augment=_langevin_for(source), seed=5,
                     prefetch=4, **KW)
    expected = CorruptShardError if error == "corrupt" else StreamError
    with pytest.raises(expected) as info:
        list(dl)
    assert info.value is exc or info.value.__cause__ is exc
    dl.close()


class Interrupt:
    """An augmentation raising KeyboardInterrupt (a notebook's Ctrl-C) in its ``at``-th call."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, x, rows, gather, generator):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return x


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_pass_interrupted_in_next_says_so_and_resumes_exactly(num_workers):
    # a finished generator raised StopIteration: a loop going on over the same iterator saw 3 of 7 batches as an epoch
    source = make_source(N, D, shard_rows=256)
    whole = [b["id"] for b in make_loader(source, batch_size=100, columns=("embedding", "id"), seed=5, **KW)]
    dl = make_loader(source, batch_size=100, columns=("embedding", "id"), augment=Interrupt(4), seed=5,
                     num_workers=num_workers, **KW)
    it, got = iter(dl), []
    with pytest.raises(KeyboardInterrupt):
        for b in it:
            got.append(b["id"])
    assert len(got) == 3
    with pytest.raises(StreamError, match="stopped with KeyboardInterrupt after 3 batches"):
        next(it)
    with pytest.raises(StreamError, match="load_state_dict"):
        list(it)
    dl.load_state_dict(dl.state_dict())
    got += [b["id"] for b in dl]
    assert len(got) == len(whole) and all(torch.equal(a, b) for a, b in zip(got, whole))
    dl.close()


def test_persistent_workers_that_died_are_started_again_by_the_next_pass():
    # a Ctrl-C to the process group ends the workers too: the next pass waited 5 s, then torch's "exited unexpectedly"
    import os
    import signal
    import time

    source = make_source(N, D, shard_rows=256)
    dl = make_loader(source, batch_size=100, columns=("id",), seed=2, num_workers=2, persistent_workers=True, **KW)
    first = [b["id"] for b in dl]
    kept = dl._iterator
    for w in kept._workers:
        os.kill(w.pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while any(w.is_alive() for w in kept._workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = [b["id"] for b in dl]
    assert len(second) == len(first) == 7
    assert sorted(torch.cat(second).tolist()) == sorted(torch.cat(first).tolist())
    assert dl._iterator is not kept and all(w.is_alive() for w in dl._iterator._workers)
    assert [b["id"] for b in dl] and dl._iterator is not None
    dl.close()
