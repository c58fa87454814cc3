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
