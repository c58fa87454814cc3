"""Issue 17 item 5: the loader's lifecycle and the validation of a resume state, through the public API.

A script that ends holding a live iterator exits cleanly; a dropped loader with persistent workers is
freed at once (no reference cycle); ``close()`` is idempotent; a state past the end of its epoch, or from
another lake with the same row count, is refused with one line, and an end-of-epoch state resumes the
next epoch on a grown lake; a block-shuffle window smaller than a shard logs one warning;
``dl.batch_size`` is the batch size; ``m2m.M2MDataLake`` iterated alone yields one epoch; Lightning
does not warn that the IterableDataset has ``__len__``."""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing
import subprocess
import sys
import textwrap
import time
import warnings
import weakref

import numpy as np
import pytest
import torch

import m2m
from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import M2MError

N, D = 20_000, 32


def unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def lake_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("life") / "lake")
    with create_m2m(M2MConfig(path=path, latent_dim=D)) as lake:
        lake.add_splats(unit(N))
    return path


@pytest.fixture
def lake(lake_dir: str):
    with open_lake(lake_dir) as lake:
        yield lake


def ids_of(batches) -> np.ndarray:
    return np.concatenate([b["id"].numpy() for b in batches])


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert isinstance(exc, M2MError) and msg and "\n" not in msg.strip(), repr(msg)
    return msg


# ----------------------------------------------------------------------------- exit holding a live iterator
EXIT_SCRIPT = textwrap.dedent("""
    import sys
    from m2m import open_lake

    lake = open_lake(sys.argv[1])
    dl = lake.export_to_dataloader(batch_size=int(sys.argv[2]), shuffle=False)
    it = iter(dl)
    batch = next(it)
    # the script ends here: the iterator, its prefetch thread and the lake are still referenced
""")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("batch_size", [1, 16])
def test_a_script_that_exits_holding_a_live_iterator_exits_cleanly(lake_dir, tmp_path, batch_size):
    script = tmp_path / "hold.py"
    script.write_text(EXIT_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), lake_dir, str(batch_size)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(5)]
    failures = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        if p.returncode != 0:
            failures.append(f"rc {p.returncode}: {err.strip()[-300:]}")
    assert not failures, f"{len(failures)} of 5 runs at batch_size={batch_size} did not exit cleanly: {failures}"


# ----------------------------------------------------------------------------- releasing workers
def _children() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.is_alive()]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("close_first", [False, True])
def test_dropping_a_persistent_worker_loader_takes_under_a_second(lake, close_first):
    before = set(p.pid for p in _children())
    dl = lake.export_to_dataloader(batch_size=1000, columns=("id",), num_workers=2, persistent_workers=True)
    assert len(ids_of(list(dl))) == N
    if close_first:
        dl.close()
    # a full collection in a long test session walks a large heap by itself: measure that walk just
    # before and allow it on top of the second (the bug was a 10 s wait on worker joins)
    start = time.perf_counter()
    gc.collect()
    walk = time.perf_counter() - start
    start = time.perf_counter()
    del dl
    gc.collect()
    took = time.perf_counter() - start
    assert took < 1.0 + 2 * walk, f"del dl; gc.collect() took {took:.1f} s (a bare gc.collect() {walk:.2f} s)"
    deadline = time.monotonic() + 1.0
    while set(p.pid for p in _children()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not set(p.pid for p in _children()) - before, "worker processes outlive the dropped loader"


@pytest.mark.timeout(120)
def test_a_dropped_loader_is_freed_without_the_cyclic_collector(lake):
    """No reference cycle: the last reference going away frees the loader (and so its workers) at once."""
    dl = lake.export_to_dataloader(batch_size=1000, columns=("id",), num_workers=2, persistent_workers=True)
    next(iter(dl))
    ref = weakref.ref(dl)
    gc.collect()
    gc.disable()
    try:
        del dl
        assert ref() is None, "the loader is in a reference cycle: only the cyclic collector frees it"
    finally:
        gc.enable()
        gc.collect()


@pytest.mark.parametrize("workers", [0, 2])
def test_close_is_idempotent(lake, workers):
    dl = lake.export_to_dataloader(batch_size=1000, columns=("id",), num_workers=workers)
    dl.close()  # before any pass
    it = iter(dl)
    next(it)
    dl.close()
    dl.close()
    del it
    dl.close()
    assert len(ids_of(list(dl))) == N  # a closed loader still starts a whole new pass


# ----------------------------------------------------------------------------- refused and accepted states
POSITION_KEYS = ("batches_yielded", "position", "batch", "batches")


def position_key(state: dict) -> str:
    for k in POSITION_KEYS:
        if k in state and isinstance(state[k], int):
            return k
    raise AssertionError(f"no batch position in the state: {sorted(state)}")


def test_a_state_past_the_end_of_the_epoch_is_refused(lake):
    dl = lake.export_to_dataloader(batch_size=100, columns=("id",))
    list(itertools.islice(dl, 5))
    state = dl.state_dict()
    state[position_key(state)] = len(dl) + 400
    fresh = lake.export_to_dataloader(batch_size=100, columns=("id",))
    with pytest.raises(M2MError) as info:
        fresh.load_state_dict(state)
        next(iter(fresh))
    one_line(info.value)


def test_a_mid_epoch_state_from_another_lake_with_the_same_rows_is_refused(lake, tmp_path):
    with create_m2m(M2MConfig(path=str(tmp_path / "other"), latent_dim=D)) as other:
        other.add_splats(unit(N, seed=9))
        assert len(other) == len(lake)
        dl = other.export_to_dataloader(batch_size=100, columns=("id",))
        list(itertools.islice(dl, 5))
        state = dl.state_dict()
    fresh = lake.export_to_dataloader(batch_size=100, columns=("id",))
    with pytest.raises(M2MError) as info:
        fresh.load_state_dict(state)
        next(iter(fresh))
    one_line(info.value)


def test_an_end_of_epoch_state_resumes_the_next_epoch_on_a_grown_lake(tmp_path):
    path = str(tmp_path / "grows")
    with create_m2m(M2MConfig(path=path, latent_dim=D)) as lake:
        lake.add_splats(unit(3000))
        dl = lake.export_to_dataloader(batch_size=100, columns=("id",))
        assert len(ids_of(list(dl))) == 3000
        end_state = dl.state_dict()
        dl2 = lake.export_to_dataloader(batch_size=100, columns=("id",))
        list(itertools.islice(dl2, 5))
        mid_state = dl2.state_dict()
        lake.add_splats(unit(500, seed=1))
    with open_lake(path) as grown:
        resumed = grown.export_to_dataloader(batch_size=100, columns=("id",))
        resumed.load_state_dict(end_state)
        got = ids_of(list(resumed))
        want = ids_of(list(grown.export_to_dataloader(batch_size=100, columns=("id",), epoch=1)))
        np.testing.assert_array_equal(got, want)  # the whole next epoch, over every row of the grown lake
        assert len(got) == 3500
        mid = grown.export_to_dataloader(batch_size=100, columns=("id",))
        with pytest.raises(M2MError) as info:  # a mid-epoch position has no meaning on other rows
            mid.load_state_dict(mid_state)
            next(iter(mid))
        one_line(info.value)


# ----------------------------------------------------------------------------- block window smaller than a shard
@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("sharded") / "lake")
    with create_m2m(M2MConfig(path=path, latent_dim=D, shard_bytes=1 << 16)) as lake:
        lake.add_splats(unit(4000))
        assert len(lake.manifest.shards) >= 4
    return path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("m2m") and r.levelno >= logging.WARNING]


def test_a_block_window_smaller_than_a_shard_logs_one_warning(sharded_dir, caplog):
    with open_lake(sharded_dir) as lake, caplog.at_level(logging.WARNING):
        dl = lake.export_to_dataloader(batch_size=100, columns=("id",), shuffle_mode="block", block_rows=64,
                                       warm_bytes=1 << 16)
        assert len(ids_of(list(dl))) == 4000
    found = _warnings(caplog)
    assert len(found) == 1, [r.getMessage() for r in found]


def test_a_block_window_larger_than_a_shard_does_not_warn(sharded_dir, caplog):
    with open_lake(sharded_dir) as lake, caplog.at_level(logging.WARNING):
        dl = lake.export_to_dataloader(batch_size=100, columns=("id",), shuffle_mode="block", block_rows=64)
        assert len(ids_of(list(dl))) == 4000
    assert not _warnings(caplog), [r.getMessage() for r in _warnings(caplog)]


# ----------------------------------------------------------------------------- what a user reads
def test_batch_size_is_the_batch_size(lake):
    assert lake.export_to_dataloader(batch_size=37).batch_size == 37
    assert lake.export_to_dataloader(batch_size=1000, num_workers=2).batch_size == 1000


def test_m2m_datalake_iterated_alone_yields_one_epoch(lake):
    if "M2MDataLake" not in m2m.__all__:
        return  # not public: nothing to promise
    dl = lake.export_to_dataloader(batch_size=1000, columns=("id",))
    ds = dl.dataset
    assert isinstance(ds, m2m.M2MDataLake)
    items = list(ds)
    got = ids_of([b for b in items if isinstance(b, dict)]) if items else np.zeros(0, np.int64)
    assert len(got) == N and len(np.unique(got)) == N, "iterating the dataset does not give one epoch of batches"
    assert all(len(b["id"]) == 1000 for b in items)


def test_lightning_does_not_warn_that_the_iterable_dataset_has_len(lake):
    pytest.importorskip("lightning")
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(D, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["embedding"]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    dl = lake.export_to_dataloader(batch_size=2000, columns=("embedding",))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Probe(), train_dataloaders=dl)
    found = [str(w.message) for w in caught if "__len__" in str(w.message)]
    assert not found, found

