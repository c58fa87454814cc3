"""What a probing user found on 2026-12-07 (each failed on the code before): a lake named ``local://``
(fsspec's other name for the local filesystem) went through the object-store path, so vacuum followed
a symlinked ``_data`` out of the lake and export wrote into the lake's own ``_manifests``; an empty lake
path became the current directory; masked ``alpha``/``kappa`` were committed as nulls; big-endian and
long-double metadata raised pyarrow's raw errors; a 400-digit size was an OverflowError traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from m2m import M2MConfig, create_m2m, open_lake
from m2m.cli.main import cli, parse_size
from m2m.errors import ConfigError, InvalidEmbeddingError, M2MError
from m2m.lake.fs import LocalFS, local_path, open_fs

D = 4


def _lake(path: Path, rows: int = 3) -> None:
    with create_m2m(M2MConfig(path=path, latent_dim=D)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((rows, D)))


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m2m.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("url, local", [("/a/b", "/a/b"), ("file:///a/b", "/a/b"), ("local:///a/b", "/a/b"),
                                        ("LOCAL:///a/b", "/a/b"), ("rel/x", "rel/x"), ("s3://b/x", None),
                                        ("memory://x", None), ("simplecache::s3://b/x", None)])
def test_local_path_knows_every_name_of_the_local_filesystem(url, local):
    assert local_path(url) == local


@pytest.mark.parametrize("url", ["", "  ", "file://", "local://"])
def test_an_empty_lake_path_is_refused_not_taken_as_the_current_directory(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="names no folder"):
        open_fs(url)
    if url.strip():
        return
    with pytest.raises(ConfigError, match="M2MConfig.path must be"):
        M2MConfig(path=url, latent_dim=D)
    np.save(tmp_path / "x.npy", np.ones((4, D), np.float32))
    r = CliRunner().invoke(cli, ["ingest", str(tmp_path / "x.npy"), "--lake", url, "-q"])
    assert r.exit_code == 1 and "names no folder" in r.output and "Traceback" not in r.output
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]  # nothing made in the current directory


def test_a_local_url_lake_is_a_local_lake(tmp_path):
    _lake(tmp_path / "lake")
    url = f"local://{tmp_path / 'lake'}"
    assert isinstance(open_fs(url), LocalFS)
    with open_lake(url) as lk:
        lk.add_splats(np.ones((2, D)))  # appends made _ids/ through fsspec's generic path and failed
        assert len(lk) == 5 and lk.verify() == []


def test_vacuum_of_a_local_url_refuses_a_symlinked_data_folder(tmp_path):
    lake, outside = tmp_path / "lake", tmp_path / "outside"
    _lake(lake)
    shutil.move(str(lake / "_data"), outside)
    os.symlink(outside, lake / "_data")
    canary = outside / ("ab" * 16 + ".arrow")  # someone else's file, named like a shard, old enough to go
    canary.write_text("precious")
    os.utime(canary, (time.time() - 7200, time.time() - 7200))
    for name in (str(lake), f"file://{lake}", f"local://{lake}"):
        r = _run("vacuum", name)
        assert r.returncode == 1 and "is a symlink" in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert canary.read_text() == "precious"


def test_export_into_a_local_url_lakes_own_folders_is_refused(tmp_path):
    lake = tmp_path / "lake"
    _lake(lake)
    out = lake / "_manifests" / "v0000000099.json"
    r = _run("export", f"local://{lake}", out, "--format", "arrow")
    assert r.returncode == 1 and "inside the lake's own" in r.stderr, r.stderr
    assert not out.exists() and _run("verify", lake, "-q").returncode == 0


@pytest.mark.parametrize("name", ["alpha", "kappa", "labels", "vectors"])
def test_a_masked_entry_is_refused_not_stored(tmp_path, name):
    x = np.random.default_rng(0).standard_normal((40, D))
    values = {"alpha": np.full(40, 2.0), "kappa": np.full(40, 5.0), "labels": np.arange(40), "vectors": x}[name]
    mask = np.zeros(values.shape, dtype=bool)
    mask[1] = True
    masked = np.ma.masked_array(values, mask=mask)
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lk:
        lk.add_splats(x[:5], **{} if name == "vectors" else {name: values[:5]})
        before = lk.version
        args = {"vectors": masked if name == "vectors" else x} | ({} if name == "vectors" else {name: masked})
        with pytest.raises(InvalidEmbeddingError, match=rf"^{name} row 1 is masked") as info:
            lk.add_splats(args.pop("vectors"), **args)
        assert "\n" not in str(info.value) and lk.version == before and lk.verify() == []
        lk.add_splats(np.ma.masked_array(x, mask=False), **{} if name == "vectors" else  # nothing masked: fine
                      {name: np.ma.masked_array(values, mask=False)})
        assert len(lk) == 45


@pytest.mark.parametrize("dtype", [">i8", ">f8", ">u2", ">M8[s]", ">m8[ms]", ">f4", ">?"])
def test_big_endian_metadata_is_stored_as_its_values(tmp_path, dtype):
    values = np.arange(3).astype(dtype)
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lk:
        lk.add_splats(np.ones((3, D)), metadata={"m": values})
        stored = lk.to_arrow()["m"].to_numpy(zero_copy_only=False)
    assert stored.dtype == values.dtype.newbyteorder("=") and (stored == values).all()


def test_long_double_metadata_is_refused_naming_the_column(tmp_path):
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("long double is float64 on this platform")
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lk:
        with pytest.raises(M2MError, match=r"metadata\['m'\] has dtype float\d+ \(long double\).*astype"):
            lk.add_splats(np.ones((3, D)), metadata={"m": np.arange(3).astype(np.longdouble)})
        assert lk.version == 0


@pytest.mark.parametrize("text", ["9" * 400, "1e400", "99999999999999999999999999TB", "9223372036854775808"],
                         ids=["400 digits", "1e400", "26 digits TB", "2**63"])
def test_a_size_beyond_int64_is_one_line(tmp_path, text):
    with pytest.raises(click.BadParameter, match="too large a size"):
        parse_size(text)
    np.save(tmp_path / "x.npy", np.ones((4, D), np.float32))
    r = CliRunner().invoke(cli, ["ingest", str(tmp_path / "x.npy"), "--lake", str(tmp_path / "lake"),
                                 "--shard-size", text])
    assert r.exit_code == 2 and "too large a size" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "lake").exists()


def test_sizes_take_exponents_and_long_digit_strings_exactly():
    assert parse_size("1e6") == 1_000_000 and parse_size("1E3kb") == 1_000_000 and parse_size("2.5e2") == 250
    assert parse_size("9223372036854775807") == 2**63 - 1  # float() would round it up past int64
    assert parse_size("1TiB") == 1 << 40


# ------------------------------------------------------------------ the stream (a second probe, same day)
@pytest.fixture
def small_lake(tmp_path):
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=8)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((101, 8)).astype(np.float32),
                      labels=np.arange(101) % 4)
        yield lk


@pytest.mark.parametrize("device", ["xpu", "meta", "mps"])
def test_a_stream_on_a_device_it_cannot_deliver_to_is_refused(small_lake, device):
    # observed: CPU batches delivered, dl.options.device still saying the device asked for
    with pytest.raises(M2MError, match=rf"device '{device}': a stream delivers batches on 'cpu' or a CUDA") as info:
        small_lake.export_to_dataloader(batch_size=7, device=device)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="M2MConfig.device must be 'cpu', 'cuda' or 'cuda:N'"):
        M2MConfig(latent_dim=8, device=device)  # (no lake config names a device its streams cannot use)


@pytest.mark.parametrize("column", ["kappa", "neighbors", "neighbor_cos"])
def test_a_geometry_column_is_the_same_whatever_the_modes(small_lake, column):
    # observed: a plain stream delivered NaN kappa for every row of a lake without an estimate; the same
    # loader with generate_samples="vmf" delivered the estimate lake.estimate_kappa() later stores
    import torch

    def streamed(**kw: object) -> dict:
        dl = small_lake.export_to_dataloader(batch_size=101, shuffle=False, columns=("id", "embedding", column), **kw)
        batch = next(iter(dl))
        dl.close()
        return batch

    plain, augmented = streamed(), streamed(generate_samples="langevin")
    assert not torch.isnan(plain[column].float()).any()
    assert torch.equal(plain[column], augmented[column]) and torch.equal(plain["id"], augmented["id"])
    small_lake.estimate_kappa()
    stored = streamed()
    assert torch.equal(plain["id"], stored["id"])
    if column != "neighbor_cos":  # (the persisted cosines are the same up to float rounding)
        assert torch.equal(plain[column], stored[column])


def test_a_mid_epoch_state_without_a_version_names_the_missing_version(small_lake):
    # observed: "stream state was saved mid-epoch over 101 rows, this loader streams 101"
    from m2m.errors import StateMismatchError

    dl = small_lake.export_to_dataloader(batch_size=7, seed=5)
    it = iter(dl)
    for _ in range(3):
        next(it)
    state = dl.state_dict()
    dl.close()
    del state["version"]
    dl2 = small_lake.export_to_dataloader(batch_size=7, seed=5)
    with pytest.raises(StateMismatchError, match="without a snapshot version.*this loader streams version"):
        dl2.load_state_dict(state)
    state["batches_yielded"] = 0  # an epoch boundary resumes any rows
    dl2.load_state_dict(state)
    assert sum(len(b) for b in dl2) == 101


@pytest.mark.parametrize("kind", ["arrow", "pandas"])
def test_a_nullable_int_metadata_column_is_refused_not_rounded_to_float(tmp_path, kind):
    # observed: pa.array([2**53 + 1, None, ...], pa.int64()) stored as float64 2**53; streamed as float32
    import pyarrow as pa

    values = [2**53 + 1, None, 16777217]
    col = pa.array(values, type=pa.int64()) if kind == "arrow" else pytest.importorskip("pandas").array(
        values, dtype="Int64")
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=8)) as lk:
        with pytest.raises(InvalidEmbeddingError, match=r"metadata column 'user_id' has 1 null rows \(row 1"):
            lk.add_splats(np.ones((3, 8)), metadata={"user_id": col})
        assert lk.version == 0
        lk.add_splats(np.ones((2, 8)), metadata={"user_id": pa.array([2**53 + 1, 3])})
        assert lk.to_arrow()["user_id"].to_pylist() == [2**53 + 1, 3]
        batch = next(iter(lk.export_to_dataloader(batch_size=2, shuffle=False, columns=("user_id",))))
        assert batch["user_id"].tolist() == [2**53 + 1, 3]


@pytest.mark.parametrize("saved_by", [99, "2", True, None])
def test_a_state_from_a_newer_or_unknown_state_version_is_refused(small_lake, saved_by):
    # observed: state_version=99 accepted without a word
    from m2m.errors import StateMismatchError

    dl = small_lake.export_to_dataloader(batch_size=7, seed=5)
    state = dl.state_dict()
    state["state_version"] = saved_by
    with pytest.raises(StateMismatchError, match=r"state_version=.*reads states up to version \d"):
        dl.load_state_dict(state)
    state["state_version"] = np.int64(1)  # an older version, as numpy may hand it back
    dl.load_state_dict(state)
    dl.close()


# ------------------------------------------------------------------ export -> ingest round trip
@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("labels", ["int", "str"])
def test_an_m2m_export_reingests_with_all_columns_as_the_lake_it_came_from(tmp_path, storage, labels):
    # observed: `m2m ingest export.parquet --all-columns` refused: "metadata column 'id' clashes with a
    # reserved name"; kappa and alpha could not be re-ingested through the CLI at all
    import pyarrow.parquet as pq

    g = np.random.default_rng(0)
    x = g.standard_normal((300, 16)) * 3
    lab = np.arange(300) % 7 if labels == "int" else np.array(["cat", "dog", "eel"])[np.arange(300) % 3]
    with create_m2m(M2MConfig(path=tmp_path / "a", latent_dim=16, storage_dtype=storage)) as lk:
        lk.add_splats(x[:200], labels=lab[:200], kappa=np.arange(200) + 1.0, alpha=np.arange(200) % 3 + 1.0,
                      metadata={"u": np.arange(200)})
        lk.estimate_kappa()
        lk.add_splats(x[200:], labels=lab[200:], metadata={"u": np.arange(100)})  # NaN kappa: not estimated
        want = lk.to_arrow()
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "a"), str(tmp_path / "a.parquet"), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["ingest", str(tmp_path / "a.parquet"), "--lake", str(tmp_path / "b"),
                                 "--all-columns", "--dtype", storage, "-q"])
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "b") as lk:
        got = lk.to_arrow()
        assert lk.verify() == []
    assert set(got.column_names) == set(want.column_names) - {"neighbors", "neighbor_cos"}
    for name in got.column_names:
        a, b = want[name].to_numpy(zero_copy_only=False), got[name].to_numpy(zero_copy_only=False)
        if name == "mu":
            a, b = np.stack(a), np.stack(b)
        if name == "mu_norm":  # the norm of the rebuilt float64 vector
            np.testing.assert_allclose(b, a, rtol=1e-14)
        elif a.dtype.kind == "f":
            assert np.array_equal(a, b, equal_nan=True), name
        else:
            assert (a == b).all(), name
    assert np.isnan(got["kappa"].to_numpy()[200:]).all()
    # the same table without the export's schema metadata is a user's table: m2m's columns are refused
    plain = want.replace_schema_metadata(None)
    pq.write_table(plain, tmp_path / "plain.parquet")
    r = CliRunner().invoke(cli, ["ingest", str(tmp_path / "plain.parquet"), "--lake", str(tmp_path / "c"),
                                 "--all-columns", "-q"])
    assert r.exit_code == 1 and "metadata column 'neighbors' has type" in r.output and "Traceback" not in r.output


def test_an_export_with_original_vectors_reingests_them(tmp_path):
    x = np.random.default_rng(1).standard_normal((50, 8)) * 5
    with create_m2m(M2MConfig(path=tmp_path / "a", latent_dim=8)) as lk:
        lk.add_splats(x, labels=np.arange(50) % 2)
        want = lk.to_arrow()
        original = lk.to_arrow(original=True)
    with create_m2m(M2MConfig(path=tmp_path / "b", latent_dim=8)) as lk:
        lk.add_table(original, all_columns=True)
        got = lk.to_arrow()
    # the original vectors were rounded to float32 on the way out: the unit rows within an ulp or two
    np.testing.assert_array_max_ulp(np.stack(got["mu"].to_numpy(zero_copy_only=False)),
                                    np.stack(want["mu"].to_numpy(zero_copy_only=False)), maxulp=2)
    np.testing.assert_allclose(got["mu_norm"].to_numpy(), want["mu_norm"].to_numpy(), rtol=1e-6)
    assert got["label"].to_pylist() == want["label"].to_pylist()


def test_a_lake_reopened_without_a_config_keeps_the_k_it_was_estimated_with(tmp_path, caplog):
    # observed: a lake estimated with knn_k=8 and reopened by open_lake(path) (default 16) made every
    # augmented stream compute kappa and neighbours again in memory at k = 16, quietly (one INFO line)
    import logging

    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=8, knn_k=8)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((300, 8)), labels=np.arange(300) % 3)
        lk.estimate_kappa()
    with open_lake(tmp_path / "lake") as lk:
        assert lk.config.knn_k == 8
        with caplog.at_level(logging.INFO, logger="m2m"):
            next(iter(lk.export_to_dataloader(batch_size=16, generate_samples="langevin")))
        assert "computed them in memory" not in caplog.text
    with open_lake(tmp_path / "lake", knn_k=16) as lk:  # asked for: kept
        assert lk.config.knn_k == 16
    with open_lake(tmp_path / "lake", M2MConfig(latent_dim=8)) as lk:  # a config says what it says
        assert lk.config.knn_k == 16


@pytest.mark.parametrize("mode, workers, context", [("vmf", 0, None), ("mixture", 0, None), ("langevin", 0, None),
                                                    ("vmf", 2, "spawn"), ("mixture", 2, "fork"),
                                                    ("langevin", 2, "fork")])
def test_augmented_rows_of_a_float16_lake_are_unit_in_float32(tmp_path, mode, workers, context):
    # observed: max |norm - 1| 5.6e-5 to 6.7e-5 (the float16 rounding of the mean carried into the draw),
    # 7e-8 on a float32 lake
    import torch

    x = np.random.default_rng(0).standard_normal((600, 64))  # far neighbours: Langevin's one-component path
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=64, storage_dtype="float16")) as lk:
        lk.add_splats(x, labels=np.arange(600) % 10, kappa=np.full(600, 1800.0))
        dl = lk.export_to_dataloader(batch_size=100, generate_samples=mode, num_workers=workers,
                                     multiprocessing_context=context)  # (spawn: the flag survives pickling)
        norms = torch.cat([torch.linalg.vector_norm(b.double(), dim=1) for b in dl])
        dl.close()
    assert len(norms) == 600 and (norms - 1).abs().max() < 1e-6


def test_a_state_saved_beside_another_live_pass_says_so(small_lake):
    # the saved position is the pass that yielded last; a kept iterator elsewhere is named in a warning
    import warnings

    dl = small_lake.export_to_dataloader(batch_size=7, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = iter(dl)
        next(one)
        assert dl.state_dict()["batches_yielded"] == 1  # one live pass: nothing to say
        del one
    kept = iter(dl)
    next(kept)
    assert sum(1 for _ in dl) == 15  # a whole epoch beside the kept iterator
    with pytest.warns(UserWarning, match="another live pass, at batch 1 of epoch"):
        state = dl.state_dict()
    assert state["batches_yielded"] == 0  # the whole epoch's: the next one's start
    next(kept)  # the kept pass yields again: it is where the stream is now
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dl.state_dict()["batches_yielded"] == 2


# ------------------------------------------------------------------ found in review of the above
def test_metadata_from_polars_and_big_endian_pandas_takes_the_arrow_null_rules(tmp_path):
    pd = pytest.importorskip("pandas")
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lk:
        lk.add_splats(np.ones((3, D)), metadata={"m": pd.Series(np.arange(3).astype(">i8"))})
        assert lk.to_arrow()["m"].to_pylist() == [0, 1, 2]
        pl = pytest.importorskip("polars")
        with pytest.raises(InvalidEmbeddingError, match="metadata column 'm' has 1 null rows"):
            lk.add_splats(np.ones((3, D)), metadata={"m": pl.Series([1, None, 2**53 + 1])})
        lk.add_splats(np.ones((3, D)), metadata={"m": pl.Series([1, 2, 2**53 + 1])})
        assert lk.to_arrow()["m"].to_pylist()[-1] == 2**53 + 1


def test_m2m_ingest_into_a_lake_estimated_at_another_k_keeps_it(tmp_path):
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D, knn_k=5)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((60, D)))
        lk.estimate_kappa()
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((20, D)).astype(np.float32))
    r = CliRunner().invoke(cli, ["ingest", str(tmp_path / "x.npy"), "--lake", str(tmp_path / "lake"),
                                 "--estimate-kappa", "-q"])
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "lake") as lk:
        assert lk.manifest.geometry["k"] == 5 and lk.snapshot.read_all("neighbors").shape == (80, 5)


def test_a_pass_that_fails_to_start_leaves_no_live_pass_behind(small_lake, monkeypatch):
    import warnings

    dl = small_lake.export_to_dataloader(batch_size=7, seed=5)
    monkeypatch.setattr(dl._ds, "rank_epoch", lambda *a: (_ for _ in ()).throw(OSError("store down")))
    with pytest.raises(OSError, match="store down"):
        next(iter(dl))
    monkeypatch.undo()
    it = iter(dl)
    next(it)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a phantom live pass made every state_dict() warn)
        assert dl.state_dict()["batches_yielded"] == 1
