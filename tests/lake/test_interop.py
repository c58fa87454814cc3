"""Reading a lake with other tools: `lake.to_arrow`, `m2m export`, and the exported files read back by
pyarrow, Polars, DuckDB and HF `datasets` (local files only, no hub)."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from m2m import M2MConfig, create_m2m, open_lake
from m2m.cli.main import cli
from m2m.errors import ConfigError

DIM = 64
ROWS = 600


def _make_lake(path, dtype="float32", estimate=True, extra_rows=40):
    """A lake with string labels, two metadata columns, several shards, sidecars on the first append's
    shards (after estimate_kappa) and a later append without sidecars."""
    g = np.random.default_rng(7)
    x = g.standard_normal((ROWS, DIM)).astype(np.float32)
    labels = np.array(["cat", "dog", "eel"], dtype=object)[np.arange(ROWS) % 3]
    meta = {"source": np.arange(ROWS, dtype=np.int64) * 10, "lang": np.array(["en", "fr"] * (ROWS // 2), dtype=object)}
    cfg = M2MConfig(path=path, latent_dim=DIM, storage_dtype=dtype, shard_bytes=1 << 16, knn_k=4)
    with create_m2m(cfg) as lake:
        lake.add_splats(x, labels=labels, metadata=meta)
        if estimate:
            lake.estimate_kappa(threads=1)
        if extra_rows:
            y = g.standard_normal((extra_rows, DIM)).astype(np.float32)
            lake.add_splats(y, labels=np.array(["cat"] * extra_rows, dtype=object),
                            metadata={"source": np.full(extra_rows, -1, np.int64),
                                      "lang": np.array(["de"] * extra_rows, dtype=object)})
            x = np.concatenate([x, y])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def lake_dir(tmp_path):
    path = tmp_path / "lake"
    unit = _make_lake(path)
    return path, unit


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_to_arrow_table_joins_sidecars(lake_dir):
    path, unit = lake_dir
    with open_lake(path) as lake:
        t = lake.to_arrow()
        s = lake.splats()
        estimated = lake.checkout(2)          # the version estimate_kappa made: every shard has a sidecar
        nbr_positions = estimated.read_all("neighbors")
        ids = estimated.ids()
        assert len(lake.manifest.shards) > 2
    assert isinstance(t, pa.Table)
    assert t.column_names == ["id", "mu", "kappa", "alpha", "mu_norm", "label", "neighbors", "neighbor_cos", "lang", "source"]
    assert t.num_rows == ROWS + 40
    assert t.schema.field("mu").type == pa.list_(pa.float32(), DIM)
    mu = t.column("mu").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    np.testing.assert_allclose(mu, unit, atol=1e-6)
    np.testing.assert_array_equal(t.column("id").to_numpy(), s["id"])
    # kappa comes from the sidecar (estimated) for the first append, NaN (not estimated) for the later one
    kappa = t.column("kappa").to_numpy()
    np.testing.assert_array_equal(kappa, s["kappa"])
    assert np.isfinite(kappa[:ROWS]).all() and np.isnan(kappa[ROWS:]).all()
    assert t.column("label").to_pylist() == s["label"].tolist()
    assert t.column("lang").to_pylist()[-1] == "de" and t.column("source").to_pylist()[:2] == [0, 10]
    # neighbours are stored as ids: they map to the positions the stream uses
    nbrs = t.column("neighbors").to_pylist()
    first = np.asarray(nbrs[:ROWS], dtype=np.int64)
    np.testing.assert_array_equal(first, np.where(nbr_positions[:ROWS] >= 0, ids[nbr_positions[:ROWS]], -1))
    assert nbrs[ROWS:] == [None] * 40  # shards appended after the estimate have no sidecar: null, not garbage


def test_to_arrow_stream_version_and_columns(lake_dir):
    path, _ = lake_dir
    with open_lake(path) as lake:
        reader = lake.to_arrow(stream=True, columns=["id", "label"])
        assert isinstance(reader, pa.RecordBatchReader)
        batches = list(reader)
        assert len(batches) == len(lake.manifest.shards)
        assert sum(b.num_rows for b in batches) == len(lake)
        assert batches[0].schema.names == ["id", "label"]
        v1 = lake.to_arrow(version=1)           # the first append, before kappa: no sidecar columns
        assert v1.num_rows == ROWS and "neighbors" not in v1.column_names
        assert np.isnan(v1.column("kappa").to_numpy()).all()
        with pytest.raises(ConfigError, match="'nope'"):
            lake.to_arrow(columns=["id", "nope"])


def test_stream_opens_one_shard_at_a_time(lake_dir):
    path, _ = lake_dir
    with open_lake(path) as lake:
        reader = lake.to_arrow(stream=True, columns=["id", "mu"])
        first = reader.read_next_batch()
        last_shard = lake.manifest.shards[-1].files[0].path
        os.remove(os.path.join(str(path), last_shard))    # not opened yet: the first batch came without it
        assert first.num_rows == lake.manifest.shards[0].rows
        with pytest.raises(OSError, match=os.path.basename(last_shard)):
            for _ in reader:
                pass


def test_pa_table_and_polars_read_the_handle(lake_dir):
    path, _ = lake_dir
    with open_lake(path) as lake:
        t = pa.table(lake)
        df = pl.DataFrame(lake)
        assert t.num_rows == len(lake) == df.height
        assert df.columns == t.column_names


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_export_read_by_pyarrow_polars_duckdb(lake_dir, tmp_path, fmt):
    path, unit = lake_dir
    out = tmp_path / f"out.{fmt}"
    r = _run("export", path, out, "--format", fmt, "-q")
    assert r.exit_code == 0, r.output
    assert f"exported {ROWS + 40:,} rows of version 3" in r.output
    with open_lake(path) as lake:
        expected = lake.to_arrow()
    if fmt == "parquet":
        got = pq.read_table(out)
        df = pl.read_parquet(out)
        con_src = f"read_parquet('{out}')"
    else:
        with pa.memory_map(str(out)) as src:
            got = pa.ipc.open_file(src).read_all()
        df = pl.read_ipc(out)
        con_src = "arrow_tbl"
    got = got.cast(expected.schema)  # Parquet names list items "element"; nothing else differs
    for name in expected.column_names:
        if name == "kappa":          # NaN (not estimated) != NaN for Arrow's equals
            np.testing.assert_array_equal(got.column(name).to_numpy(), expected.column(name).to_numpy())
        else:
            assert got.column(name).equals(expected.column(name)), name
    assert df.height == ROWS + 40
    np.testing.assert_allclose(np.stack(df["mu"].to_numpy()), unit, atol=1e-6)
    assert df.filter(pl.col("label") == "dog").height == ROWS // 3
    arrow_tbl = got  # noqa: F841 (DuckDB's replacement scan reads the local variable)
    con = duckdb.connect()
    n, n_dog, width = con.sql(f"select count(*), count(*) filter (where label = 'dog'), max(len(mu)) "
                              f"from {con_src}").fetchall()[0]
    assert (n, n_dog, width) == (ROWS + 40, ROWS // 3, DIM)
    first_coord = [r[0] for r in con.sql(f"select mu[1] from {con_src} order by id").fetchall()]
    np.testing.assert_allclose(np.asarray(first_coord, dtype=np.float32), unit[:, 0], atol=1e-6)


def test_float16_lake_export_for_duckdb(tmp_path):
    path = tmp_path / "lake16"
    unit = _make_lake(path, dtype="float16", estimate=False, extra_rows=0)
    out = tmp_path / "mu32.arrow"
    r = _run("export", path, out, "--format", "arrow", "--float32", "--columns", "id,mu", "-q")
    assert r.exit_code == 0, r.output
    with pa.memory_map(str(out)) as src:
        t = pa.ipc.open_file(src).read_all()
    assert t.column_names == ["id", "mu"] and t.schema.field("mu").type == pa.list_(pa.float32(), DIM)
    con = duckdb.connect()
    tbl = t  # noqa: F841
    vals = [r[0] for r in con.sql("select mu[2] as m from tbl order by id").fetchall()]
    np.testing.assert_allclose(np.asarray(vals, np.float32), unit[:, 1], atol=2e-3)
    with open_lake(path) as lake:    # without --float32, DuckDB cannot scan float16 Arrow data: the documented case
        t16 = lake.to_arrow(columns=["mu"])
        assert t16.schema.field("mu").type == pa.list_(pa.float16(), DIM)
        with pytest.raises(duckdb.Error, match="Unsupported"):
            con.sql("select count(*) from t16").fetchall()


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_export_read_by_hf_datasets_offline(lake_dir, tmp_path, monkeypatch, fmt):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path, unit = lake_dir
    out = tmp_path / f"out.{fmt}"
    assert _run("export", path, out, "--format", fmt, "-q").exit_code == 0
    ds = datasets.load_dataset(fmt, data_files=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == ROWS + 40
    assert set(ds.column_names) == {"id", "mu", "kappa", "alpha", "mu_norm", "label", "neighbors", "neighbor_cos",
                                    "source", "lang"}
    row = ds[5]
    assert row["label"] == "eel" and row["id"] == 5
    np.testing.assert_allclose(np.asarray(row["mu"], np.float32), unit[5], atol=1e-6)
    mu = ds.with_format("numpy")["mu"]
    assert np.asarray(mu).shape == (ROWS + 40, DIM)


def test_export_errors_are_one_line(lake_dir, tmp_path):
    path, _ = lake_dir
    r = _run("export", path, tmp_path / "nowhere" / "x.parquet", "-q")
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    r = _run("export", path, tmp_path / "x.parquet", "--columns", "id,bogus", "-q")
    assert r.exit_code == 1 and "'bogus'" in r.output
    r = _run("export", path, tmp_path / "x.parquet", "--version", "99", "-q")
    assert r.exit_code == 1 and "no version 99" in r.output
    assert not any(p.name.startswith(".x.parquet") for p in tmp_path.iterdir())  # no temp file left behind
