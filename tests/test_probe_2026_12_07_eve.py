"""Combination bugs found by probing users on 2026-12-07 (evening) that fit no other test module."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import DimensionMismatchError

D = 4


def test_open_lake_refuses_a_dim_or_dtype_keyword_the_lake_does_not_have(tmp_path):
    # open_lake(p, storage_dtype="float32") on a float16 lake opened it without a word, while the same
    # setting in config= was refused
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=D, storage_dtype="float16")) as lk:
        lk.add_splats(np.eye(D))
    for kw in (dict(storage_dtype="float32"), dict(latent_dim=999)):
        with pytest.raises(DimensionMismatchError, match=f"open_lake was given {next(iter(kw))}="):
            open_lake(tmp_path / "l", **kw)
    with open_lake(tmp_path / "l", storage_dtype="float16", latent_dim=D) as lk:   # the lake's own: fine
        assert len(lk) == D


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_float_labels_are_checked_without_warnings(dtype):
    with create_m2m(M2MConfig(latent_dim=D)) as lk, warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.add_splats(np.eye(D), labels=np.arange(D).astype(dtype))
        assert lk.to_arrow()["label"].to_pylist() == list(range(D))


def test_open_lake_moves_to_the_new_head_when_the_one_it_read_was_vacuumed_meanwhile(tmp_path, monkeypatch):
    # beside a writer that appends, compacts and vacuums (keep=1), about 1 open in 16,000 read the head,
    # then found its files gone (a newer head published and the old one vacuumed) and called a healthy
    # lake damaged (CorruptShardError "shard file ... is missing")
    import m2m.api as api

    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=D)) as lk:
        for k in range(3):
            lk.add_splats(np.random.default_rng(k).standard_normal((20, D)))
        stale = lk.manifest
        lk.compact()
        lk.vacuum(keep=1, min_age_s=0)
        head = lk.version
    real = api.read_manifest
    calls: list[object] = []

    def read(fs, version=None):  # the first read sees the head before the writer's commit
        calls.append(version)
        return stale if len(calls) == 1 else real(fs, version)

    monkeypatch.setattr(api, "read_manifest", read)
    with open_lake(tmp_path / "l") as lk:
        assert lk.version == head and len(lk) == 60 and calls == [None, None]


def _writer_between(tmp_path, monkeypatch, where: str):
    """A lake of 3 versions, and a hook that, the first time ``where`` runs in m2m.lake.manifest (before it
    reads a segment; after it lists versions), lets another
    handle append, compact and vacuum (keep=1): the version the reader listed loses its files mid-read."""
    import m2m.lake.manifest as mf

    path = tmp_path / "l"
    monkeypatch.setattr(mf, "SEGMENT_SHARDS", 2)   # format 3: the shards listed in segment files
    with create_m2m(M2MConfig(path=path, latent_dim=D)) as lk:
        for k in range(3):
            lk.add_splats(np.random.default_rng(k).standard_normal((20, D)))
    writer = open_lake(path)
    real = getattr(mf, where)
    fired: list[int] = []

    def hooked(*args, **kwargs):
        out = real(*args, **kwargs) if where != "_read_segment" or fired else None
        if not fired:
            fired.append(1)
            writer.add_splats(np.random.default_rng(9).standard_normal((20, D)))
            writer.compact()      # (new segments: the listed version's are no newer version's)
            writer.vacuum(keep=1, min_age_s=0)
        return real(*args, **kwargs) if out is None else out

    monkeypatch.setattr(mf, where, hooked)
    return path, writer


@pytest.mark.parametrize("where", ["list_versions", "_read_segment"])
def test_reading_the_latest_version_moves_on_when_a_writer_vacuums_it_meanwhile(tmp_path, monkeypatch, where):
    # observed beside a writer appending and vacuuming (keep=1) in a loop, ~30 of 9,841 opens failed: the
    # listed head's manifest was gone (a raw FileNotFoundError), its segment was gone (CorruptShardError
    # "segment ... is missing"), or every listed manifest was gone ("no m2m lake at ...")
    path, writer = _writer_between(tmp_path, monkeypatch, where)
    with writer, open_lake(path) as lk:
        assert lk.version == writer.version and len(lk) == 80


def test_an_older_version_vacuumed_while_it_is_read_is_one_line(tmp_path, monkeypatch):
    path, writer = _writer_between(tmp_path, monkeypatch, "list_versions")
    from m2m.errors import LakeNotFoundError

    with writer, pytest.raises(LakeNotFoundError, match="has no version 3 any more"):
        open_lake(path, version=3)


@pytest.mark.parametrize("warm", [True, False])
def test_a_stream_stage_that_fails_on_a_file_names_it(monkeypatch, warm):
    # observed: a cache disk out of inodes or space surfaced as "m2m-prefetch: a stream stage failed:
    # OSError(28, 'No space left on device')" and "loading the warm arena failed: OSError(28, ...)": the repr
    # of an OSError drops the file it names
    import errno

    from m2m.errors import StreamError
    from m2m.stream.stages.cold import ColdReader

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/abc.part")

    monkeypatch.setattr(ColdReader, "read_rows" if warm else "gather", full)
    with create_m2m(M2MConfig(latent_dim=D, warm_bytes=1 << 30 if warm else 0)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((64, D)))
        with pytest.raises(StreamError, match=r"OSError: \[Errno 28\] No space left on device: '/cache/abc.part'"):
            for _ in lk.export_to_dataloader(batch_size=8, shuffle=True):
                pass


@pytest.mark.parametrize("workers, warm", [(0, None), (2, None), (0, 0)])
def test_a_float64_value_beyond_float32_is_refused_by_the_stream_not_served_as_inf(workers, warm):
    # observed: metadata {"f": [1e300, -1e300, 3.5e38, 1.0]} streamed as [inf, -inf, inf, 1.0] without a word,
    # while lake[0:4]["f"] read the exact values
    from m2m.errors import StreamError

    with create_m2m(M2MConfig(latent_dim=D, **({} if warm is None else {"warm_bytes": warm}))) as lk:
        lk.add_splats(np.eye(D), metadata={"f": np.array([1.0, 2.0, 3.5e38, 4.0])})
        assert lk[0:4]["f"].tolist() == [1.0, 2.0, 3.5e38, 4.0]
        kw = {"num_workers": workers, "persistent_workers": False} if workers else {}
        with pytest.raises(StreamError, match="column 'f' holds 3.5e\\+38, beyond float32's range"):
            for _ in lk.export_to_dataloader(batch_size=2, columns=("f",), **kw):
                pass
        ok = [b["id"] for b in lk.export_to_dataloader(batch_size=2, columns=("id",), **kw)]
        assert len(ok) == 2
    with create_m2m(M2MConfig(latent_dim=D, **({} if warm is None else {"warm_bytes": warm}))) as lk:
        lk.add_splats(np.eye(D), metadata={"f": np.array([1.0, np.inf, -np.inf, 3e38])})   # stored inf: inf
        got = np.concatenate([b["f"].numpy() for b in lk.export_to_dataloader(batch_size=2, columns=("f",),
                                                                               shuffle=False, **kw)])
        assert got.tolist() == [1.0, np.inf, -np.inf, np.float32(3e38)]


def test_an_empty_lake_of_another_dim_says_it_is_empty(tmp_path):
    # observed: a first ingest into an object store that failed (a NaN row) left an empty version 0 at dim 8,
    # and the corrected retry at dim 16 was refused: "lake ... has latent_dim 8, the config asks for 16"
    create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=8)).close()
    with pytest.raises(DimensionMismatchError, match=r"has latent_dim 8, the config asks for 16 \(the lake holds no "
                                                     r"rows: a first write that failed leaves it; remove .* to start"):
        create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=16))
    # a lake with history rolled back to no rows is no failed first write: no advice to remove it
    from m2m.lake.recovery import rollback

    with create_m2m(M2MConfig(path=tmp_path / "h", latent_dim=8)) as lk:
        lk.add_splats(np.eye(8))
    rollback(tmp_path / "h", 0)
    with pytest.raises(DimensionMismatchError) as info:
        create_m2m(M2MConfig(path=tmp_path / "h", latent_dim=16))
    assert "remove" not in str(info.value)


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_a_cache_dir_that_is_no_folder_is_one_line(tmp_path, kind):
    # observed: "[Errno 17] File exists: '...'" for a cache_dir naming a regular file or a dangling symlink
    from m2m.errors import ConfigError
    from m2m.lake.cache import ShardCache

    path = tmp_path / "c"
    path.write_text("x") if kind == "file" else path.symlink_to(tmp_path / "nowhere")
    what = "not a folder" if kind == "file" else "a symbolic link to nothing"
    with pytest.raises(ConfigError, match=f"cache_dir '{path}' is {what}"):
        ShardCache(None, "root", "memory://root", str(path), 1 << 20)


def test_a_float64_value_beyond_float32_is_refused_on_a_partial_arenas_cold_path():
    # a review found a fully shuffled stream over a partial warm arena serving requests that miss many blocks
    # from the cold tier, narrowing float64 to float32 unchecked: 1e300 arrived as inf
    from m2m.errors import StreamError

    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((40_000, D)), metadata={"f": np.full(40_000, 1e300)})
        with pytest.raises(StreamError, match="column 'f' holds 1e\\+300, beyond float32's range"):
            next(iter(lk.export_to_dataloader(batch_size=24, columns=("f",), shuffle_mode="full", seed=0,
                                              warm_mode="arena", warm_bytes=64 << 10, block_rows=256,
                                              chunk_batches=1, background_fill=False, prefetch=1)))


@pytest.mark.parametrize("values, row", [([1, "a", 2.5], 1), (["x", "y", float("nan")], 2), (("a", 3, "c"), 1)])
def test_a_metadata_list_of_numbers_and_strings_is_refused(values, row):
    # observed: metadata={"m": [1, "a", 2.5]} was stored as the strings ['1', 'a', '2.5'] (numpy's asarray),
    # while the same values as an object array were refused naming row 1
    from m2m.errors import InvalidEmbeddingError

    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        with pytest.raises(InvalidEmbeddingError, match=f"metadata\\['m'\\] row {row} is .*all numbers or all strings"):
            lk.add_splats(np.eye(D)[:3], metadata={"m": values})
        assert len(lk) == 0
        lk.add_splats(np.eye(D)[:3], metadata={"m": ["a", None, "c"]})   # a null among strings is still a null
        assert lk.to_arrow()["m"].to_pylist() == ["a", None, "c"]


@pytest.mark.parametrize("kind", ["float8", "sparse"])
def test_a_float8_or_sparse_tensor_is_one_clear_error(kind):
    # observed: torch's raw TypeError ("Got unsupported ScalarType Float8_e4m3fn"; a sparse layout's)
    import torch

    from m2m.errors import InvalidEmbeddingError

    x = torch.eye(D)
    x = x.to(torch.float8_e4m3fn) if kind == "float8" else x.to_sparse()
    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        with pytest.raises(InvalidEmbeddingError, match="vectors (has dtype torch.float8_e4m3fn|is a torch.sparse_coo)"):
            lk.add_splats(x)


def test_add_splat_chunks_takes_empty_chunks_and_names_a_bad_one():
    # observed: a 0-row chunk was refused ("vectors is empty (0 rows)", no chunk named), a chunk without
    # "vectors" raised KeyError, a non-dict numpy's IndexError, and a misspelled key ("label") was ignored
    from m2m.errors import InvalidEmbeddingError

    x = np.random.default_rng(0).standard_normal((6, D))
    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        lk.add_splat_chunks(lambda: iter([{"vectors": x[:3]}, {"vectors": x[:0]}, {"vectors": x[3:]}]))
        assert len(lk) == 6
        for chunks, match in [([{"vectors": x}, {"labels": [1]}], "chunk 1 is dict without a vectors entry"),
                              ([x], "chunk 0 is ndarray; each chunk is a dict with keys"),
                              ([{"vectors": x, "label": [0] * 6}], r"chunk 0 has unknown key\(s\) \['label'\]"),
                              ([{"vectors": x[:0]}], "every chunk is empty")]:
            with pytest.raises(InvalidEmbeddingError, match=match):
                lk.add_splat_chunks(lambda chunks=chunks: iter(chunks))
        assert len(lk) == 6 and lk.version == 1


def test_a_null_label_in_a_table_names_its_row():
    # observed: "label column 'lab' has null rows" named no row
    import pyarrow as pa

    from m2m.errors import InvalidEmbeddingError

    v = np.random.default_rng(0).standard_normal((10, D)).astype(np.float32)
    t = pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), D),
                  "lab": pa.array([1, 2, 3, 4, 5, 6, 7, None, 9, 10])})
    with create_m2m(M2MConfig(latent_dim=D)) as lk:
        with pytest.raises(InvalidEmbeddingError, match=r"has null rows \(row 7 is null\)"):
            lk.add_table(t, column="v", label_column="lab")


def test_passes_of_one_worker_loader_started_from_several_threads_are_exact_epochs():
    # observed: one loader with 2 workers iterated from 3 threads: passes of 20,000 rows held ~15,000 distinct
    # ids (workers forked with another pass's numbers), or failed with a ConfigError blaming a wrapping
    # DataLoader that did not exist
    import threading

    with create_m2m(M2MConfig(latent_dim=32)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((20_000, 32)).astype(np.float32))
        dl = lk.export_to_dataloader(batch_size=100, columns=("id",), num_workers=2, seed=1)
        got, errors = [], []

        def run():
            for _ in range(6):
                try:
                    ids = np.concatenate([b["id"].numpy().copy() for b in dl])
                    got.append((len(ids), len(np.unique(ids))))
                except Exception as exc:  # noqa: BLE001 - every failure is the bug
                    errors.append(f"{type(exc).__name__}: {exc}")

        for _ in range(2):
            threads = [threading.Thread(target=run) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        dl.close()
    assert not errors and got == [(20_000, 20_000)] * 36, (errors[:2], [g for g in got if g != (20_000, 20_000)])


def test_closing_a_temporary_lake_waits_for_a_commit_in_flight():
    # observed: close() from the main thread while another thread was in add_splats removed the folder under
    # the commit, whose manifest then landed in a recreated _manifests: the folder stayed after exit, without
    # its owner file, so no later clean-up removed it
    import os
    import threading
    import time

    from m2m.errors import LakeClosedError

    lk = create_m2m(M2MConfig(latent_dim=D))
    path = lk.path
    inside = threading.Event()

    def slow_chunks():
        yield {"vectors": np.eye(D)}
        inside.set()
        time.sleep(0.5)           # the commit is in flight while close() is called
        yield {"vectors": np.eye(D)}

    got = []
    writer = threading.Thread(target=lambda: got.append(lk.add_splat_chunks(slow_chunks)))
    writer.start()
    assert inside.wait(30)
    lk.close()
    writer.join(30)
    assert len(got) == 1 and len(got[0]) == 2 * D and not os.path.exists(path)
    with pytest.raises(LakeClosedError):
        lk.add_splats(np.eye(D))
