"""Issue 10 regressions: the loader's epoch contract, rank detection at iteration, DataLoader keywords,
pickling, and the read-only stream (each observed failure reproduced as a test)."""

from __future__ import annotations

import copy
import itertools
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from stream_helpers import make_source

from m2m import M2MConfig, create_m2m
from m2m.errors import ConfigError
from m2m.stream.loader import make_loader

N, D, BS = 51_000, 8, 1000
KW = dict(warm_bytes=64 << 20, hot_bytes=0)


@pytest.fixture(scope="module")
def lake():
    lake = create_m2m(M2MConfig(device="cpu", latent_dim=D))
    lake.add_splats(torch.randn(N, D, generator=torch.Generator().manual_seed(0)))
    yield lake
    lake.close()


def ids(batches) -> np.ndarray:
    return np.concatenate([b["id"].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def source_loader(**kw):
    return make_loader(make_source(N, D), batch_size=BS, columns=("id",), **{**KW, **kw})


# ----------------------------------------------------------------------------- item 1: epochs
def test_passes_bounded_by_len_are_whole_epochs(lake):
    dl = lake.export_to_dataloader(batch_size=BS)
    assert [sum(1 for _ in itertools.islice(dl, len(dl))) for e in range(4)] == [51] * 4


@pytest.mark.parametrize("workers", [0, 2])
def test_len_bounded_passes_cover_every_row_in_a_new_order(workers):
    dl = source_loader(num_workers=workers, chunk_batches=4)
    epochs = [ids(list(itertools.islice(dl, len(dl)))) for _ in range(3)]
    for e in epochs:
        assert len(e) == N and len(np.unique(e)) == N
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert dl.epoch == 3


def test_set_epoch_after_iter_and_before_the_first_batch_gives_the_whole_epoch():
    """Lightning's order: iter(dl) in setup_data, then sampler.set_epoch(e), then batches."""
    dl = source_loader()
    reference = [ids(list(source_loader(epoch=e))) for e in range(3)]
    for e in range(3):
        it = iter(dl)
        dl.sampler.set_epoch(e)  # what lightning's _set_sampler_epoch reaches
        np.testing.assert_array_equal(ids(list(it)), reference[e])


def test_set_epoch_pins_every_following_pass():
    dl = source_loader()
    dl.set_epoch(5)
    a, b = ids(list(dl)), ids(list(dl))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, ids(list(source_loader(epoch=5))))


def test_a_peek_does_not_shorten_the_next_pass(lake):
    dl = lake.export_to_dataloader(batch_size=BS)
    next(iter(dl))
    assert sum(1 for _ in dl) == 51


def test_zip_of_the_loader_with_itself_pairs_whole_epochs(lake):
    dl = lake.export_to_dataloader(batch_size=BS)
    assert sum(1 for _ in zip(dl, dl)) == 51
    src = source_loader()
    pairs = list(zip(src, src))
    assert len(pairs) == 51
    for k in (0, 1):
        got = ids([p[k] for p in pairs])
        assert len(np.unique(got)) == N


def test_a_pass_left_by_break_does_not_resume():
    dl = source_loader()
    for i, _ in enumerate(dl):
        if i == 9:
            break
    again = ids(list(dl))
    assert len(again) == N and len(np.unique(again)) == N


def test_resume_happens_only_after_load_state_dict():
    dl = source_loader()
    full = [ids(list(source_loader(epoch=e))) for e in range(2)]
    head = ids(list(itertools.islice(dl, 7)))
    state = dl.state_dict()
    assert len(ids(list(dl))) == N  # the live loader starts a whole new epoch
    restored = source_loader()
    restored.load_state_dict(state)
    assert len(restored) == 51
    tail = ids(list(restored))
    np.testing.assert_array_equal(np.concatenate([head, tail]), full[0])
    np.testing.assert_array_equal(ids(list(restored)), full[1])  # then normal epochs


def test_state_saved_at_len_restores_into_the_next_whole_epoch():
    dl = source_loader()
    list(itertools.islice(dl, len(dl)))
    state = dl.state_dict()
    assert (state["epoch"], state["batches_yielded"]) == (1, 0)
    restored = source_loader()
    restored.load_state_dict(state)
    np.testing.assert_array_equal(ids(list(restored)), ids(list(source_loader(epoch=1))))


def test_set_epoch_for_the_resumed_epoch_keeps_the_resume():
    """Lightning restores (load_state_dict), calls iter, then set_epoch(the same epoch)."""
    dl = source_loader()
    dl.set_epoch(3)
    head = ids(list(itertools.islice(dl, 20)))
    restored = source_loader()
    restored.load_state_dict(dl.state_dict())
    it = iter(restored)
    restored.sampler.set_epoch(3)
    np.testing.assert_array_equal(np.concatenate([head, ids(list(it))]), ids(list(source_loader(epoch=3))))


# ----------------------------------------------------------------------------- item 2: rank at iteration
def test_rank_and_world_are_read_when_a_pass_starts(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dl = source_loader()
    explicit = source_loader(rank=0, world_size=1)
    assert len(dl) == 51
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert len(dl) == 26 and len(dl.dataset) == N // 2
    mine = ids(list(dl))
    other = ids(list(source_loader(rank=0, world_size=2)))
    assert len(mine) == N // 2 and not set(mine) & set(other)
    assert len(explicit) == 51 and len(ids(list(explicit))) == N  # explicit arguments win
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert len(dl) == 51 and len(ids(list(dl))) == N  # the world changed: the order is recomputed


def test_bad_torchrun_environment_is_named(monkeypatch):
    monkeypatch.setenv("RANK", "one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK='one'"):
        len(source_loader())


# ----------------------------------------------------------------------------- item 3: keywords, pickling
@pytest.mark.parametrize("kw", ["pin_memory", "persistent_workers", "prefetch_factor", "timeout", "worker_init_fn",
                                "multiprocessing_context", "generator", "collate_fn"])
def test_standard_dataloader_keywords_are_accepted(lake, kw, tmp_path):
    values = {"pin_memory": False, "persistent_workers": True, "prefetch_factor": 2, "timeout": 30,
              "worker_init_fn": _touch_init, "multiprocessing_context": "fork",
              "generator": torch.Generator().manual_seed(3), "collate_fn": _double}
    workers = 1 if kw in ("persistent_workers", "prefetch_factor", "multiprocessing_context", "timeout",
                          "worker_init_fn") else 0
    dl = lake.export_to_dataloader(batch_size=5000, num_workers=workers, **{kw: values[kw]})
    out = list(dl)
    assert len(out) == 11 and sum(len(b) for b in out) == N


def _touch_init(worker_id: int) -> None:
    torch.manual_seed(worker_id)


def _double(batch: torch.Tensor) -> torch.Tensor:
    return batch * 2


def test_collate_fn_applies_to_each_whole_batch():
    plain = list(source_loader(seed=1))
    collated = list(source_loader(seed=1, collate_fn=lambda b: {"n": len(b["id"]), "id": b["id"] + 1}))
    assert [c["n"] for c in collated] == [len(b["id"]) for b in plain]
    np.testing.assert_array_equal(ids(collated), ids(plain) + 1)


def test_generator_is_the_seed():
    by_gen = ids(list(source_loader(generator=torch.Generator().manual_seed(77))))
    np.testing.assert_array_equal(by_gen, ids(list(source_loader(seed=77))))
    with pytest.raises(ConfigError, match="disagree"):
        source_loader(seed=1, generator=torch.Generator().manual_seed(2))


def test_worker_init_fn_runs_in_each_worker(tmp_path):
    dl = source_loader(num_workers=2, worker_init_fn=_MarkWorker(str(tmp_path)))
    assert len(ids(list(dl))) == N
    assert sorted(os.listdir(tmp_path)) == ["worker0", "worker1"]


class _MarkWorker:
    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, worker_id: int) -> None:
        open(os.path.join(self.where, f"worker{worker_id}"), "w").close()


def test_persistent_workers_serve_whole_new_epochs():
    dl = source_loader(num_workers=2, persistent_workers=True, chunk_batches=4)
    ref = source_loader()
    for e in range(3):
        got = ids(list(itertools.islice(dl, len(dl)))) if e == 1 else ids(list(dl))
        np.testing.assert_array_equal(got, ids(list(ref)))


@pytest.mark.parametrize("bad, match", [
    (dict(prefetch_factor=2), "prefetch_factor"),
    (dict(persistent_workers=True), "persistent_workers"),
    (dict(multiprocessing_context="spawn"), "multiprocessing_context"),
    (dict(timeout=-1), "timeout"),
    (dict(collate_fn=3), "collate_fn"),
    (dict(in_order=False), "in_order"),
])
def test_keywords_that_cannot_apply_are_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        source_loader(**bad)


@pytest.mark.parametrize("name", ["sampler", "batch_sampler"])
def test_sampler_keywords_are_refused_by_the_facade(lake, name):
    with pytest.raises(ConfigError, match=f"{name}=.*cannot apply"):
        lake.export_to_dataloader(batch_size=BS, **{name: torch.utils.data.SequentialSampler(range(3))})


def test_pin_memory_without_cuda_warns_like_torch():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: batches are pinned")
    with pytest.warns(UserWarning, match="pin_memory"):
        dl = source_loader(pin_memory=True)
    assert len(ids(list(dl))) == N


def test_len_of_the_dataset_is_the_rows_of_one_ranks_epoch(lake):
    dl = lake.export_to_dataloader(batch_size=BS)
    assert len(dl.dataset) == N
    assert len(lake.export_to_dataloader(batch_size=BS, rank=1, world_size=2).dataset) == N // 2
    assert len(lake.export_to_dataloader(batch_size=BS, rank=1, world_size=4, drop_last=True).dataset) == 12_000


def test_loader_pickles_and_deepcopies_and_the_copies_stream_the_same(lake):
    dl = lake.export_to_dataloader(batch_size=BS, columns=("id", "embedding"), num_workers=0)
    list(itertools.islice(dl, 3))  # live readers, arena, pool: none of it travels
    for clone in (pickle.loads(pickle.dumps(dl)), copy.deepcopy(dl)):
        assert clone.epoch == dl.epoch
        np.testing.assert_array_equal(ids(list(clone)), ids(list(copy.deepcopy(dl))))
    pickle.dumps(dl.dataset)


def test_spawned_workers_receive_the_pickled_dataset(lake):
    dl = lake.export_to_dataloader(batch_size=5000, columns=("id",), num_workers=1,
                                   multiprocessing_context="spawn", prefetch_factor=1)
    got = ids(list(dl))
    assert len(got) == N and len(np.unique(got)) == N


def test_stateful_dataloader_over_the_dataset_is_refused_clearly(lake):
    from torchdata.stateful_dataloader import StatefulDataLoader

    dl = lake.export_to_dataloader(batch_size=BS)
    for wrapper in (StatefulDataLoader(dl.dataset, batch_size=None), torch.utils.data.DataLoader(dl.dataset)):
        with pytest.raises(ConfigError, match="state_dict"):
            next(iter(wrapper))
    with pytest.raises(Exception, match="StatefulDataLoader is not supported"):
        next(iter(StatefulDataLoader(dl.dataset, batch_size=None, num_workers=1)))


# ----------------------------------------------------------------------------- item 4: a stream never writes
@pytest.mark.parametrize("options", [dict(generate_samples=True), dict(importance_sampling="kappa"),
                                     dict(generate_samples="vmf", importance_sampling=True)])
def test_a_stream_never_writes_even_while_a_writer_holds_the_lock(options, caplog):
    from m2m.lake.lake import write_lock

    lake = create_m2m(M2MConfig(device="cpu", latent_dim=16))
    lake.add_splats(torch.randn(3000, 16, generator=torch.Generator().manual_seed(1)))
    version, listing = lake.version, sorted(os.listdir(lake.path) + os.listdir(os.path.join(lake.path, "_data")))
    with write_lock(lake._fs), caplog.at_level(logging.INFO, logger="m2m.stream.from_lake"):
        dl = lake.export_to_dataloader(batch_size=100, columns=("embedding", "id", "weight"), **options)
        batches = list(dl)
    assert len(batches) == 30 and all(torch.isfinite(b["embedding"]).all() for b in batches)
    assert len(list(pickle.loads(pickle.dumps(dl)))) == 30  # the in-memory geometry travels with it
    assert lake.version == version and lake.refresh() == version
    assert sorted(os.listdir(lake.path) + os.listdir(os.path.join(lake.path, "_data"))) == listing
    persist = [r for r in caplog.records if "estimate_kappa()" in r.getMessage()]
    assert len(persist) == 1 and persist[0].levelno == logging.INFO
    if options.get("importance_sampling"):  # what the loader computed is what estimate_kappa persists
        from m2m.stream.from_lake import computed_geometry

        in_memory = computed_geometry(lake.snapshot, lake.config.knn_k, lake.config.seed)
        np.testing.assert_allclose(in_memory.kappa, lake.estimate_kappa(), rtol=1e-5)
        np.testing.assert_array_equal(in_memory.neighbors, lake.snapshot.read_all("neighbors"))
    lake.close()


def test_progress_bars_stay_off_when_stderr_is_not_a_terminal(capfd):
    lake = create_m2m(M2MConfig(device="cpu", latent_dim=16))
    lake.add_splats(torch.randn(2000, 16))
    lake.export_to_dataloader(batch_size=100, generate_samples=True)
    assert "kappa (in memory)" not in capfd.readouterr().err
    lake.close()
