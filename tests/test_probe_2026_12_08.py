"""Bugs found by probing helpers on 2026-12-08 (random access, mixtures), each with the test that fails
on the code before its fix."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import CorruptShardError
from m2m.lake.manifest import FileEntry
from m2m.lake.shard import OpenFiles, ShardFile


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------ shard files' descriptors


@pytest.mark.parametrize("verify", [False, True])
def test_a_collected_copy_of_a_handle_leaves_the_originals_files_open(tmp_path, verify):
    # a pickled (or deep-copied) handle carried its reader's descriptor numbers; collecting the copy
    # closed the original's, and the original then read whichever file took the number next
    xa, xb = unit(5000, 64, 0), unit(5000, 64, 1)
    for name, x in (("a", xa), ("b", xb)):
        with create_m2m(M2MConfig(path=str(tmp_path / name), latent_dim=64)) as lk:
            lk.add_splats(x)
    a = open_lake(str(tmp_path / "a"), verify_reads=verify)
    assert np.array_equal(a[0]["mu"], xa[0])
    copy = pickle.loads(pickle.dumps(a))
    assert np.array_equal(copy[1]["mu"], xa[1])   # the copy reads, through its own descriptors
    del copy
    gc.collect()
    b = open_lake(str(tmp_path / "b"), verify_reads=verify)
    b[0]
    assert np.array_equal(a[2500]["mu"], xa[2500])
    a.close()
    b.close()


class _Rows(Dataset):
    def __init__(self, lake) -> None:
        self.lake = lake

    def __len__(self) -> int:
        return len(self.lake)

    def __getitem__(self, i: int):
        r = self.lake[i]
        return {"pos": i, "id": r["id"], "mu": torch.from_numpy(np.array(r["mu"]))}


def test_a_map_style_dataset_in_spawned_workers_reads_its_own_rows(tmp_path):
    x = unit(3000, 16, 2)
    path = str(tmp_path / "lake")
    with create_m2m(M2MConfig(path=path, latent_dim=16, shard_bytes=1 << 16)) as lake:
        for k in range(3):
            lake.add_splats(x[k * 1000:(k + 1) * 1000])
    lake = open_lake(path, verify_reads=False)
    lake[2999]                    # the parent holds a descriptor; its number means nothing in a worker
    seen = 0
    for batch in DataLoader(_Rows(lake), batch_size=500, num_workers=1, multiprocessing_context="spawn"):
        pos = batch["pos"].numpy()
        assert np.array_equal(batch["mu"].numpy(), x[pos]) and np.array_equal(batch["id"].numpy(), pos)
        seen += len(pos)
    assert seen == 3000
    lake.close()


def test_a_lake_of_more_shards_than_the_open_file_limit_reads(tmp_path):
    # one descriptor per shard ever touched, never closed: lake[i] over a 300-shard lake under a soft limit
    # of 256 raised "Too many open files", and so did a stream pass
    path = str(tmp_path / "lake")
    x = unit(1500, 8, 3)
    with create_m2m(M2MConfig(path=path, latent_dim=8)) as lake:
        for k in range(300):
            lake.add_splats(x[5 * k:5 * k + 5])
    code = textwrap.dedent(f"""
        import resource, numpy as np
        import m2m, m2m.stream
        from m2m import open_lake
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        lake = open_lake({path!r})
        n = sum(len(b["id"]) for b in lake.export_to_dataloader(batch_size=100, columns=("id",), shuffle=False))
        assert n == 1500, n
        ids = [int(lake[i]["id"]) for i in range(0, len(lake), 5)]
        assert ids == list(range(0, 1500, 5))
        # the limit holds for the process: random access, then a training and a validation loader of one
        # handle (each reader with its own 128 ran out, 2026-12-08)
        train = lake.export_to_dataloader(batch_size=64, columns=("id",), shuffle_mode="full")
        val = lake.export_to_dataloader(batch_size=64, columns=("id",), shuffle=False)
        for epoch in range(2):
            assert sum(len(b["id"]) for b in train) == 1500
            assert sum(len(b["id"]) for b in val) == 1500
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def _files(tmp_path, n: int) -> list[tuple[str, FileEntry, bytes]]:
    out = []
    for k in range(n):
        data = bytes([k]) * 1000
        path = str(tmp_path / f"f{k}")
        with open(path, "wb") as f:
            f.write(data)
        out.append((path, FileEntry(path=f"f{k}", bytes=1000, crc32=0, columns=("mu",)), data))
    return out


def test_open_files_keeps_at_most_its_limit_and_never_closes_a_file_in_use(tmp_path):
    limiter = OpenFiles(2)
    files = [(ShardFile(p, e, open_files=limiter), data) for p, e, data in _files(tmp_path, 4)]
    buf = bytearray(10)
    for rnd in range(3):
        for f, data in files:
            f.read_into(100, memoryview(buf))
            assert bytes(buf) == data[:10]
            assert len(limiter) <= 2 and sum(g._fd is not None for g, _ in files) <= 2
    busy, _ = files[0]
    with busy._fileno_held() as fd:     # a read using file 0 while the others come and go
        for f, data in files[1:]:
            f.read_into(0, memoryview(buf))
        assert busy._fd == fd and os.fstat(fd)  # still open: only idle files are closed
    assert limiter.closed > 0


def test_a_file_replaced_between_two_opens_is_refused(tmp_path):
    (path, entry, data), = _files(tmp_path, 1)
    limiter = OpenFiles(1)
    f = ShardFile(path, entry, open_files=limiter)
    other = ShardFile(str(tmp_path / "g"), entry, open_files=limiter)
    with open(str(tmp_path / "g"), "wb") as g:
        g.write(b"x" * 1000)
    buf = bytearray(4)
    f.read_into(0, memoryview(buf))
    other.read_into(0, memoryview(buf))      # closes f's descriptor (limit 1)
    assert f._fd is None
    os.replace(str(tmp_path / "g"), path + ".new")
    with open(path + ".new", "wb") as g:
        g.write(b"y" * 1000)
    os.replace(path + ".new", path)           # another file at f's path
    with pytest.raises(CorruptShardError, match="replaced"):
        f.read_into(0, memoryview(buf))


# ------------------------------------------------------------------ mixtures


@pytest.fixture()
def two_lakes(tmp_path):
    import m2m

    paths = {}
    for name, labels in (("s", np.array(["cat", "dog"] * 50)), ("i", np.arange(100) % 3)):
        paths[name] = str(tmp_path / name)
        with create_m2m(M2MConfig(path=paths[name], latent_dim=8)) as lake:
            lake.add_splats(unit(100, 8, 4), labels=labels)
    return m2m.mix(paths, {"s": 1, "i": 1})


@pytest.mark.parametrize("codes, source, what", [
    ([0, 1], [0.5, 1.0], "source"),               # a float source matched no lake: its label came back None
    ([0, 1], [float("nan"), 1.0], "source"),
    ([1.5, 2.0], [1, 1], "label codes"),          # int-label lake: float codes came back as labels
    ([0, 1], [True, False], "source"),
])
def test_mixture_decode_labels_refuses_what_is_not_an_integer(two_lakes, codes, source, what):
    from m2m.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{what} must be integers"):
        two_lakes.decode_labels(np.asarray(codes), np.asarray(source))


def test_mixture_decode_labels_still_decodes(two_lakes):
    s = two_lakes.names.index("s")
    out = two_lakes.decode_labels(np.array([0, 1, 2]), np.array([s, s, 1 - s]))
    assert out.tolist() == ["cat", "dog", 2]


def test_a_weight_whose_share_rounds_to_zero_is_refused(tmp_path):
    import m2m
    from m2m.errors import ConfigError

    paths = {}
    for name in ("a", "b"):
        paths[name] = str(tmp_path / name)
        with create_m2m(M2MConfig(path=paths[name], latent_dim=8)) as lake:
            lake.add_splats(unit(50, 8, 5))
    with pytest.raises(ConfigError, match="'b' is 4e-10 of the total"):
        m2m.mix(paths, {"a": 1, "b": 4e-10})
    assert m2m.mix(paths, {"a": 1, "b": 0}).counts == {"a": 100, "b": 0}


# ------------------------------------------------------------------ the config


@pytest.mark.parametrize("field, value", [("latent_dim", np.int64(8)), ("seed", np.int64(3)), ("knn_k", np.int32(4)),
                                          ("langevin_steps", np.uint8(3)), ("langevin_dt", np.float32(0.05)),
                                          ("warm_bytes", np.int64(1 << 20)), ("cache_bytes", np.int64(1 << 20))])
def test_config_takes_numpy_scalars_as_the_python_numbers_they_are(field, value):
    # "must be an int >= 2, got np.int64(8)" while every other entry point took numpy scalars (2026-12-08)
    cfg = M2MConfig(**{field: value})
    got = getattr(cfg, field)
    assert type(got) is (float if field == "langevin_dt" else int) and got == value


@pytest.mark.parametrize("value", [np.bool_(True), np.float64(8.0), torch.tensor(8), "8"])
def test_config_still_refuses_what_is_not_an_int(value):
    from m2m.errors import ConfigTypeError

    with pytest.raises(ConfigTypeError, match="latent_dim must be an int"):
        M2MConfig(latent_dim=value)


def test_stream_options_keep_a_torch_device_as_its_name():
    from m2m import StreamOptions

    assert StreamOptions(device=torch.device("cpu")).device == "cpu"
    assert StreamOptions(columns=["embedding", "id"]).columns == ("embedding", "id")


@pytest.mark.parametrize("metadata", [["src"], True])
def test_array_input_refuses_table_style_metadata_in_one_line(tmp_path, metadata):
    from m2m.errors import InvalidEmbeddingError

    with create_m2m(M2MConfig(latent_dim=4)) as lake, pytest.raises(InvalidEmbeddingError, match="dict of columns"):
        lake.add_splats(unit(3, 4, 0), metadata=metadata)


def test_config_takes_a_torch_device_as_its_name():
    assert M2MConfig(device=torch.device("cpu")).device == "cpu"


# ------------------------------------------------------------------ review of the day's changes


def test_close_while_threads_read_never_reads_another_file(tmp_path):
    # close() swapped the descriptor under running reads: EBADF, or bytes of whichever file took the
    # number next (found in review; older than the open-file limit)
    import random
    import threading

    n, size = 6, 1 << 18
    rng = np.random.default_rng(0)
    truth = []
    files = []
    limiter = OpenFiles(3)
    for i in range(n):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        (tmp_path / f"f{i}").write_bytes(data)
        truth.append(data)
        files.append(ShardFile(str(tmp_path / f"f{i}"), FileEntry(f"f{i}", size, 0, ("mu",)), cache_blocks=0,
                               open_files=limiter))
    bad: list[str] = []
    stop = threading.Event()

    def closer() -> None:
        r = random.Random(1)
        while not stop.is_set():
            files[r.randrange(n)].close()

    def reader(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(600):
            i, lo = r.randrange(n), r.randrange(size // 2)
            k = r.randrange(1, size // 2)
            buf = np.empty(k, np.uint8)
            try:
                files[i].read_into(lo, buf.data)
            except Exception as exc:  # noqa: BLE001
                bad.append(f"{type(exc).__name__}: {exc}")
                continue
            if buf.tobytes() != truth[i][lo:lo + k]:
                bad.append(f"wrong bytes of file {i}")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        c = threading.Thread(target=closer)
        c.start()
        readers = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(120)
        stop.set()
        c.join(10)
    finally:
        sys.setswitchinterval(switch)
    assert not bad, bad[:3]
    for f in files:
        f.close()
    assert all(f._fd is None for f in files)


def test_a_collection_inside_the_open_file_limit_closing_files_does_not_deadlock(tmp_path):
    # a finalizer (a loader in a reference cycle collected on a reading thread) closing the reader's files
    # while OpenFiles.used held its lock: the thread waited on itself forever (found in review)
    code = textwrap.dedent(f"""
        import gc, os, sys, threading, weakref
        from m2m.lake.manifest import FileEntry
        from m2m.lake.shard import OpenFiles, ShardFile
        stuck = []
        for n in range(1, 41):
            d = {str(tmp_path)!r} + f"/r{{n}}"
            os.makedirs(d)
            paths = [f"{{d}}/f{{i}}" for i in range(3)]
            for p in paths:
                open(p, "wb").write(os.urandom(4096))
            of = OpenFiles(limit=1)
            files = [ShardFile(p, FileEntry(p, 4096, 0, ("x",)), cache_blocks=0, open_files=of) for p in paths]
            files[0].read_into(0, memoryview(bytearray(16)))

            class Owner:
                def __init__(self):
                    self.me = self

            def read():
                gc.collect()
                o = Owner()
                weakref.finalize(o, lambda fs=files: [f.close() for f in fs])
                del o
                gc.set_threshold(n)
                files[1].read_into(0, memoryview(bytearray(16)))
            t = threading.Thread(target=read, daemon=True)
            t.start()
            t.join(10)
            gc.set_threshold(700, 10, 10)
            if t.is_alive():
                stuck.append(n)
                break
        print("stuck", stuck)
        os._exit(1 if stuck else 0)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]


def test_a_waiter_whose_lock_file_went_away_closes_nothing_of_anyone_else(tmp_path, monkeypatch):
    # the reopen after a removed lock file failed (the cache folder was gone), and the error path closed
    # the old descriptor number again: by then another thread's file (found in review)
    import threading

    import m2m.lake.cache as cache_mod

    path = str(tmp_path / "locks" / "x.lock")
    os.makedirs(os.path.dirname(path))
    holder = cache_mod._FileLock(path)
    assert holder.try_acquire()
    victim: list[int] = []
    real_open = cache_mod._FileLock._open

    def open_then_fail(self):
        if victim:   # the reopen: someone else's open takes the number just freed, then ours fails
            victim.append(os.open(os.devnull, os.O_RDONLY))
            raise FileNotFoundError(2, "No such file or directory", self.path)
        victim.append(-1)
        return real_open(self)

    monkeypatch.setattr(cache_mod._FileLock, "_open", open_then_fail)
    waiter = cache_mod._FileLock(path)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            waiter.acquire(True, 10, "x")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    t = threading.Thread(target=wait)
    t.start()
    import time
    time.sleep(0.3)
    holder.remove()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], FileNotFoundError)
    os.fstat(victim[-1])          # still open: the waiter did not close it
    os.close(victim[-1])



def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_closing_a_handle_closes_the_files_its_random_access_opened(tmp_path):
    path = str(tmp_path / "lake")
    with create_m2m(M2MConfig(path=path, latent_dim=8)) as lake:
        for k in range(40):
            lake.add_splats(unit(3, 8, k))
    gc.disable()   # (a collection would close them anyway: the leak showed between collections)
    try:
        before = _open_fds()
        for _ in range(3):
            with open_lake(path) as lake:
                lake[list(range(0, 120, 3))]
        assert _open_fds() <= before + 2
    finally:
        gc.enable()


def test_commits_and_recovery_of_a_lake_of_many_versions_stat_each_version_file_at_most_once(tmp_path,
                                                                                            monkeypatch):
    # every manifest read stat-ed every version file: an append of a 1,000-version lake made 1,007 stats,
    # and `m2m repair` read each version with a fresh listing (quadratic: 8,000 versions took 267 s)
    from m2m.lake.recovery import repair, rollback

    path = str(tmp_path / "lake")
    with create_m2m(M2MConfig(path=path, latent_dim=8)) as lake:
        for k in range(150):
            lake.add_splats(unit(2, 8, k))
    calls = [0]
    real = os.stat

    def counting(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)
    monkeypatch.setattr(os, "stat", counting)
    with open_lake(path) as lake:
        lake.add_splats(unit(2, 8, 999))
    assert calls[0] < 50, calls[0]
    calls[0] = 0
    assert repair(path, dry_run=True)["moved"] == []
    assert calls[0] < 200, calls[0]
    calls[0] = 0
    rollback(path, to=140)
    assert calls[0] < 200, calls[0]
    with open_lake(path) as lake:
        assert len(lake) == 280 and lake.verify() == []
