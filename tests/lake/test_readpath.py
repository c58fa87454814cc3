"""The read path of shard files: block checksums written at commit, positional checked reads,
and a stream that survives (with `CorruptShardError`) shards truncated or rewritten mid-epoch."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import crc32c
import numpy as np
import pytest
import torch

from m2m.api import create_m2m, open_lake
from m2m.config import M2MConfig
from m2m.errors import CorruptShardError
from m2m.lake import shard as shard_mod
from m2m.lake.manifest import FileEntry, Manifest
from m2m.lake.shard import BLOCK_BYTES, ShardFile, column_extents, verify_file
from m2m.stream.loader import make_loader

DIM = 64


def _make_lake(path, rows: int = 6000, shard_bytes: int = 1 << 18, seed: int = 0):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((rows, DIM)).astype(np.float32)
    labels = rng.integers(0, 10, rows)
    with create_m2m(M2MConfig(path=path, latent_dim=DIM, shard_bytes=shard_bytes)) as lake:
        lake.add_splats(mu, labels=labels)
    return mu / np.linalg.norm(mu, axis=1, keepdims=True), labels


def _file(path, entry: FileEntry) -> str:
    return os.path.join(path, entry.path)


def test_block_checksums_are_written_with_each_file_and_match_its_bytes(lake_path):
    _make_lake(lake_path)
    with open_lake(lake_path) as lake:
        files = lake.manifest.files()
    assert len(files) > 3
    for f in files:
        with open(_file(lake_path, f), "rb") as fh:
            data = fh.read()
        assert f.block_bytes == BLOCK_BYTES and len(data) == f.bytes
        want = tuple(crc32c.crc32c(data[i: i + BLOCK_BYTES]) for i in range(0, len(data), BLOCK_BYTES))
        assert f.block_crc32c == want


def test_manifest_block_fields_round_trip_and_are_optional():
    from m2m.lake.manifest import ShardEntry, manifest_checksum

    entry = FileEntry(path="_data/a.arrow", bytes=10, crc32=1, columns=("id", "mu", "kappa", "alpha"),
                      block_bytes=4, block_crc32c=(1, 2, 3))
    man = Manifest(version=1, dim=2, dtype="float32", next_id=1, shards=(ShardEntry(1, 0, 0, (entry,)),))
    doc = json.loads(man.to_json())
    back = Manifest.from_json(json.dumps(doc).encode(), "test").shards[0].files[0]
    assert back == entry
    del doc["shards"][0]["files"][0]["block_bytes"], doc["shards"][0]["files"][0]["block_crc32c"]
    doc["checksum"] = manifest_checksum(doc)   # manifests carry their own checksum (format 2)
    old = Manifest.from_json(json.dumps(doc).encode(), "test").shards[0].files[0]
    assert old.block_bytes is None and old.block_crc32c is None  # files of older lakes
    doc["shards"][0]["files"][0].update(block_bytes=4, block_crc32c=[1, 2])  # 2 blocks cannot cover 10 bytes
    doc["checksum"] = manifest_checksum(doc)
    with pytest.raises(CorruptShardError, match="do not cover"):
        Manifest.from_json(json.dumps(doc).encode(), "test")


def _small_block_file(tmp_path, size: int = 10_000, block: int = 1024) -> tuple[str, bytes, FileEntry]:
    data = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = str(tmp_path / "f.bin")
    with open(path, "wb") as f:
        f.write(data)
    crcs = tuple(crc32c.crc32c(data[i: i + block]) for i in range(0, size, block))
    return path, data, FileEntry("f.bin", size, 0, (), block_bytes=block, block_crc32c=crcs)


def test_positional_reads_return_the_file_bytes_at_any_alignment(tmp_path):
    path, data, entry = _small_block_file(tmp_path)
    rng = np.random.default_rng(0)
    with ShardFile(path, entry, cache_blocks=2) as f:
        spans = [(0, len(data)), (0, 1024), (1024, 2048), (1023, 1), (1000, 3000), (9999, 1), (9216, 784)]
        spans += [(int(a), int(rng.integers(0, len(data) - a + 1))) for a in rng.integers(0, len(data), 200)]
        for start, n in spans:
            buf = bytearray(n)
            f.read_into(start, memoryview(buf))
            assert bytes(buf) == data[start: start + n], (start, n)
        assert f.bytes_checked >= len(data)
        with pytest.raises(CorruptShardError, match="outside"):
            f.read_into(9990, memoryview(bytearray(20)))


def test_a_changed_block_is_caught_naming_file_and_block(tmp_path):
    path, data, entry = _small_block_file(tmp_path)
    with open(path, "r+b") as fh:
        fh.seek(5000)
        fh.write(bytes([data[5000] ^ 1]))
    with ShardFile(path, entry) as f:
        buf = bytearray(1024)
        f.read_into(0, memoryview(buf))  # other blocks still read fine
        for start, n in [(4096, 1024), (4500, 10), (0, 10_000)]:
            with pytest.raises(CorruptShardError, match=r"f\.bin changed on disk: block 4 "):
                f.read_into(start, memoryview(bytearray(n)))


def test_a_file_cut_short_is_an_error_not_a_crash(tmp_path):
    path, _, entry = _small_block_file(tmp_path)
    os.truncate(path, 4000)
    with ShardFile(path, entry) as f:
        f.read_into(0, memoryview(bytearray(3000)))
        with pytest.raises(CorruptShardError, match=r"f\.bin was cut short while being read: it has 4000 bytes"):
            f.read_into(3000, memoryview(bytearray(5000)))
    plain = dataclasses.replace(entry, block_bytes=None, block_crc32c=None)  # an older file: length still checked
    with ShardFile(path, plain) as f, pytest.raises(CorruptShardError, match="cut short"):
        f.read_into(0, memoryview(bytearray(10_000)))


def test_column_extents_locate_each_column_in_the_file(lake_path):
    mu, labels = _make_lake(lake_path, rows=2000)
    with open_lake(lake_path) as lake:
        snap = lake.snapshot
        lo = 0
        for s, sh in enumerate(snap.manifest.shards):
            ext = column_extents(snap.fs, sh.files[0])
            with open(_file(lake_path, sh.files[0]), "rb") as fh:
                raw = fh.read()
            got = np.frombuffer(raw[ext["mu"].offset: ext["mu"].offset + sh.rows * ext["mu"].row_bytes], np.float32)
            np.testing.assert_allclose(got.reshape(sh.rows, DIM), mu[lo: lo + sh.rows], rtol=1e-6)
            lab = np.frombuffer(raw[ext["label"].offset: ext["label"].offset + sh.rows * 8], np.int64)
            np.testing.assert_array_equal(lab, labels[lo: lo + sh.rows])
            assert ext["mu"].rows == sh.rows and snap.column_extent(s, "mu") == ext["mu"]
            lo += sh.rows


@pytest.mark.parametrize("mode", [{"warm_mode": "cold"}, {"warm_bytes": 1 << 30}, {"warm_bytes": 300_000}])
def test_the_stream_over_a_lake_equals_its_rows(lake_path, mode):
    # every tier (direct cold gathers, a whole-lake arena, a partial LRU arena) delivers the lake's rows
    mu, labels = _make_lake(lake_path)
    kw = {"warm_bytes": 1 << 30, "hot_bytes": 0, **mode}
    with open_lake(lake_path) as lake:
        dl = make_loader(lake.snapshot, batch_size=100, columns=("embedding", "label", "id"), **kw)
        for _ in range(2):
            seen = []
            for b in dl:
                pos = b["id"].numpy()
                np.testing.assert_allclose(b["embedding"].numpy(), mu[pos], rtol=1e-6)
                np.testing.assert_array_equal(b["label"].numpy(), labels[pos])
                seen.append(pos)
            assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(mu)))
        reader = dl._res.reader("stream")  # the loader's kept stream reader (m2m.stream.pipeline.Resources)
        assert reader.positional and reader.bytes_checked() > 0
        dl.close()


_CHILD = textwrap.dedent('''
    import os, sys
    import numpy as np
    from m2m.api import open_lake
    from m2m.errors import CorruptShardError
    from m2m.stream.loader import make_loader

    path, workers, how, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    lake = open_lake(path)
    snap = lake.snapshot
    mu, ids = snap.read_all("mu").copy(), snap.ids().copy()
    entry = snap.manifest.shards[len(snap.manifest.shards) // 2].files[0]
    victim = os.path.join(path, entry.path)
    kw = dict(warm_mode="cold") if mode == "cold" else dict(warm_bytes=1_500_000)
    dl = make_loader(snap, batch_size=64, columns=("embedding", "id"), num_workers=workers,
                     **{"warm_bytes": 1 << 30, "hot_bytes": 0, **kw})
    batches = bad = 0
    try:
        for epoch in range(3):
            for i, b in enumerate(dl):
                batches += 1
                pos = np.searchsorted(ids, b["id"].numpy())
                bad += int((b["embedding"].numpy() != mu[pos]).any(axis=1).sum())
                if epoch == 0 and i == 3:
                    if how == "truncate":
                        os.truncate(victim, entry.bytes // 3)
                    else:  # same size, other bytes: a rewrite in place
                        with open(victim, "r+b") as f:
                            f.seek(entry.bytes // 2)
                            chunk = f.read(4096)
                            f.seek(entry.bytes // 2)
                            f.write(bytes(c ^ 0x5A for c in chunk))
        print("NO ERROR", batches, bad)
    except CorruptShardError as exc:
        print("CORRUPT", batches, bad, os.path.basename(victim) in str(exc), str(exc).splitlines()[-1][:300])
''')


@pytest.mark.slow
@pytest.mark.parametrize("how,workers,mode", [("truncate", 0, "cold"), ("truncate", 2, "arena"),
                                              ("rewrite", 0, "arena"), ("rewrite", 2, "cold")])
def test_a_shard_truncated_or_rewritten_mid_epoch_is_an_error_never_a_crash_or_wrong_rows(lake_path, workers,
                                                                                          how, mode):
    # in a child process, so that a SIGBUS shows as a crash (m2m dea2f31, which memory-mapped
    # shards: exit -7 with 0 workers, "worker killed by signal: Bus error ... shared memory" with 2,
    # and 44 changed rows delivered after the rewrite); shards
    # of 4 checksum blocks, so that most reads come from disk, not from the readers' block caches
    _make_lake(lake_path, rows=24_000, shard_bytes=1 << 20)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(lake_path), str(workers), how, mode],
                          check=False, capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-3000:]}"
    assert out and out[-1].startswith("CORRUPT"), (out, proc.stderr[-3000:])
    _, batches, bad, named, _msg = out[-1].split(" ", 4)
    assert int(bad) == 0, out[-1]  # no changed row was ever delivered
    assert named == "True", out[-1]  # the message names the file
    assert int(batches) >= 4


def test_files_without_block_checksums_keep_the_whole_file_crc32(lake_path, monkeypatch):
    # lakes written before block checksums: the stream reads them (length-checked), and their
    # whole-file CRC32 is checked once at first use as before
    from m2m.lake import writer

    real = writer.write_shard_file

    def old_style(fs, columns, stamp=None):
        return dataclasses.replace(real(fs, columns, stamp), block_bytes=None, block_crc32c=None)

    monkeypatch.setattr(writer, "write_shard_file", old_style)
    mu, _ = _make_lake(lake_path, rows=3000)
    with open_lake(lake_path) as lake:
        assert all(f.block_crc32c is None for f in lake.manifest.files())
        dl = make_loader(lake.snapshot, batch_size=100, columns=("embedding", "id"), warm_mode="cold",
                         warm_bytes=1 << 30, hot_bytes=0)
        for b in dl:
            np.testing.assert_allclose(b["embedding"].numpy(), mu[b["id"].numpy()], rtol=1e-6)
        entry = lake.manifest.shards[1].files[0]
    path = _file(lake_path, entry)
    with open(path, "r+b") as f:
        f.seek(entry.bytes // 2)
        byte = f.read(1)
        f.seek(entry.bytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptShardError, match="CRC32"):
        verify_file(open_lake(lake_path).snapshot.fs, entry)
    with open_lake(lake_path) as lake, pytest.raises(CorruptShardError, match=os.path.basename(path)):
        list(make_loader(lake.snapshot, batch_size=100, columns=("embedding",), warm_mode="cold",
                         warm_bytes=1 << 30, hot_bytes=0))


def test_verify_checks_blocks_and_names_the_block(lake_path):
    _make_lake(lake_path, rows=3000)
    with open_lake(lake_path) as lake:
        entry = lake.manifest.shards[0].files[0]
        fs = lake.snapshot.fs
    verify_file(fs, entry)
    path = _file(lake_path, entry)
    with open(path, "r+b") as f:
        f.seek(BLOCK_BYTES // 2 if entry.bytes > BLOCK_BYTES else 100)
        f.write(b"\0\1\2\3")
    with pytest.raises(CorruptShardError, match=r"changed on disk: block 0 "):
        verify_file(fs, entry)
    assert shard_mod.BLOCK_BYTES == BLOCK_BYTES


def test_cold_gathers_of_scattered_rows_read_checked_blocks(lake_path):
    # augmentation's neighbour reads: arbitrary rows, from the files when no complete arena exists
    from m2m.stream.stages.cold import ColdReader

    mu, _ = _make_lake(lake_path)
    with open_lake(lake_path) as lake:
        reader = ColdReader(lake.snapshot, ["mu"])
        rows = np.random.default_rng(0).integers(0, len(mu), 3000)
        out = torch.empty((len(rows), DIM))
        reader.gather("mu", rows, out)
        np.testing.assert_allclose(out.numpy(), mu[rows], rtol=1e-6)
        assert reader.bytes_checked() > 0
        reader.close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cold_gathers_copy_only_the_rows_of_sparse_runs_of_every_column_kind(tmp_path, dtype):
    # rows wanted few per checksum run are copied one by one from checked (cached) blocks, the others a
    # run at a time: mixed in one gather, for vectors, int64 labels and ids (a 1-D column's row is a
    # view, never a numpy scalar that a read would fill as a copy), in shuffled order
    from m2m.stream.stages.cold import SPARSE_UNIT_ROWS, ColdReader

    path = str(tmp_path / "lake")
    rng = np.random.default_rng(1)
    mu = rng.standard_normal((6000, DIM)).astype(np.float32)
    labels = rng.integers(0, 10**12, 6000)
    with create_m2m(M2MConfig(path=path, latent_dim=DIM, shard_bytes=1 << 18, storage_dtype=dtype)) as lake:
        lake.add_splats(mu, labels=labels)
    with open_lake(path) as lake:
        truth = {"mu": lake.snapshot.read_all("mu"), "label": np.asarray(lake.snapshot.read_all("label")),
                 "id": np.asarray(lake.snapshot.read_all("id"))}
        reader = ColdReader(lake.snapshot, list(truth))
        dense = np.arange(700, 1500)                                        # whole runs
        scattered = rng.choice(np.arange(2000, 6000), 60, replace=False)   # ~1 row per run of vectors
        few = np.array([4100, 5, 2500])                                      # 1 row per shard: every column
        for rows in (rng.permutation(np.concatenate([dense, scattered])), few):
            for name, want in truth.items():
                out = torch.empty((len(rows), *want.shape[1:]), dtype=torch.from_numpy(want[:1]).dtype)
                out.fill_(-7)
                reader.gather(name, rows, out)
                np.testing.assert_array_equal(out.numpy(), want[rows], err_msg=name)
        assert SPARSE_UNIT_ROWS >= 1
        reader.close()


@pytest.mark.parametrize("per_run", [2, 6, 12, 40])
def test_sparse_runs_read_each_block_once_and_rows_that_straddle_blocks_are_exact(tmp_path, per_run):
    # a few rows from each of many runs, wanted in random order: each checked block is read once (runs and
    # rows are visited in file order, so the reader's small block cache serves a block's rows and a block
    # two runs share), and every row, those straddling two blocks included, is exact
    from m2m.stream.stages.cold import SPARSE_UNIT_ROWS, ColdReader

    path = str(tmp_path / "lake")
    rng = np.random.default_rng(2)
    d = 60                                          # 240-byte rows: some straddle the 256 KiB blocks
    mu = rng.standard_normal((40_000, d)).astype(np.float32)
    with create_m2m(M2MConfig(path=path, latent_dim=d, shard_bytes=8 << 20)) as lake:
        lake.add_splats(mu)
    with open_lake(path) as lake:
        want = lake.snapshot.read_all("mu")
        reader = ColdReader(lake.snapshot, ["mu"])
        ext = reader._extents["mu"][0]
        unit = BLOCK_BYTES // ext.row_bytes
        runs = 3 * rng.choice(len(want) // unit // 3 - 1, 8, replace=False) + 1
        # per_run rows of run r, 2 of each of its neighbours (which share a block with it): sparse and whole
        # runs side by side when per_run > SPARSE_UNIT_ROWS
        rows = np.concatenate([np.concatenate([r * unit + rng.choice(unit, per_run, replace=False),
                                               (r - 1) * unit + rng.choice(unit, 2, replace=False),
                                               (r + 1) * unit + rng.choice(unit, 2, replace=False)]) for r in runs])
        straddling = [r for r in range(len(want))
                      if (ext.offset + r * ext.row_bytes) // BLOCK_BYTES
                      != (ext.offset + (r + 1) * ext.row_bytes - 1) // BLOCK_BYTES]
        rows = rng.permutation(np.concatenate([rows, straddling[:5]]))
        out = torch.full((len(rows), d), -7.0)
        reader.gather("mu", rows, out)
        np.testing.assert_array_equal(out.numpy(), want[rows])
        # the blocks a gather must check: those of the rows of sparse runs, and all of a run read whole
        run, n = np.unique(rows // unit, return_counts=True)
        whole = run[n > SPARSE_UNIT_ROWS]
        starts = [ext.offset + r * ext.row_bytes for r in rows[~np.isin(rows // unit, whole)]]
        spans = [(s, s + ext.row_bytes) for s in starts]
        spans += [(ext.offset + u * unit * ext.row_bytes, ext.offset + (u + 1) * unit * ext.row_bytes) for u in whole]
        blocks = {b for lo, hi in spans for b in range(lo // BLOCK_BYTES, (hi - 1) // BLOCK_BYTES + 1)}
        assert reader.bytes_checked() <= len(blocks) * BLOCK_BYTES, "a block was read and checked twice"
        reader.close()


def test_a_sparse_cold_read_of_a_row_in_a_changed_block_raises(lake_path):
    from m2m.stream.stages.cold import ColdReader

    mu, _ = _make_lake(lake_path)
    with open_lake(lake_path) as lake:
        reader = ColdReader(lake.snapshot, ["mu"])
        ext = reader._extents["mu"][1]
        row = 3                                             # the 4th row of shard 1
        with open(ext.path, "r+b") as fh:                   # flip one byte of another row of its block
            fh.seek(ext.offset + (row + 1) * ext.row_bytes)
            b = fh.read(1)
            fh.seek(ext.offset + (row + 1) * ext.row_bytes)
            fh.write(bytes([b[0] ^ 0xFF]))
        out = torch.empty((1, DIM))
        with pytest.raises(CorruptShardError, match="changed on disk"):
            reader.gather("mu", np.array([int(reader.offsets[1]) + row]), out)
        reader.close()


def test_scattered_reads_through_a_whole_lake_arena_load_only_what_they_miss(lake_path):
    from m2m.stream import columns as cols
    from m2m.stream.stages.cold import ColdReader
    from m2m.stream.stages.warm import WarmArena

    mu, _ = _make_lake(lake_path)
    with open_lake(lake_path) as lake:
        snap = lake.snapshot
        arena = WarmArena(ColdReader(snap, ["mu"]), cols.resolve(snap, ("embedding",)), 500, budget_bytes=1 << 30)
        reader = ColdReader(snap, ["mu"]).for_scattered_reads(arena)
        rows = np.random.default_rng(0).integers(0, len(mu), 40)
        out = torch.empty((len(rows), DIM))
        reader.gather("mu", rows, out)
        np.testing.assert_allclose(out.numpy(), mu[rows], rtol=1e-6)
        assert arena.loads == len(np.unique(rows // 500)) and reader.bytes_checked() == 0
        partial = WarmArena(ColdReader(snap, ["mu"]), cols.resolve(snap, ("embedding",)), 500, budget_bytes=1 << 20)
        cached = ColdReader(snap, ["mu"]).for_scattered_reads(partial)  # not whole: a cache of checked blocks
        cached.gather("mu", rows, out)
        np.testing.assert_allclose(out.numpy(), mu[rows], rtol=1e-6)
        first = cached.bytes_checked()
        cached.gather("mu", rows, out)
        assert first > 0 and cached.bytes_checked() == first  # the second pass read only the cache
