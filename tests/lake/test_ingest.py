"""Ingest: metadata columns, hive-partitioned directories, in-memory Arrow inputs (tables, readers, batch
iterables, Polars, HF datasets), byte-sized chunks read once, and one-line messages for empty, truncated
and unwritable inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from m2m import M2MConfig, create_m2m, open_lake
from m2m.cli.main import cli
from m2m.errors import InvalidEmbeddingError
from m2m.lake.ingest import open_source

DIM = 32
N = 900


@pytest.fixture
def table():
    g = np.random.default_rng(3)
    x = g.standard_normal((N, DIM)).astype(np.float32)
    return pa.table({
        "emb": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM),
        "cls": pa.array(np.arange(N) % 5),
        "lang": pa.array(np.array(["en", "fr", "de"])[np.arange(N) % 3]),
        "score": pa.array(np.linspace(0, 1, N)),
    }), x / np.linalg.norm(x, axis=1, keepdims=True)


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "StopIteration" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    for n in needles:
        assert n in r.output, r.output


def test_metadata_columns_are_kept_only_when_asked(tmp_path, table):
    t, unit = table
    pq.write_table(t, tmp_path / "x.parquet", row_group_size=200)
    r = _run("ingest", tmp_path / "x.parquet", "--lake", tmp_path / "a", "--label-column", "cls", "-q")
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "a") as lake:
        assert lake.manifest.metadata == {}
    r = _run("ingest", tmp_path / "x.parquet", "--lake", tmp_path / "b", "--label-column", "cls",
             "--meta-column", "lang", "--meta-column", "score", "-q")
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "b") as lake:
        s = lake.splats()
        assert set(lake.manifest.metadata) == {"lang", "score"}
    assert s["lang"].tolist() == t.column("lang").to_pylist()
    np.testing.assert_array_equal(s["score"], t.column("score").to_numpy())
    np.testing.assert_allclose(s["mu"], unit, atol=1e-6)
    r = _run("ingest", tmp_path / "x.parquet", "--lake", tmp_path / "c", "--label-column", "cls", "--all-columns", "-q")
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "c") as lake:
        assert set(lake.manifest.metadata) == {"lang", "score"}   # everything but the vectors and labels
    r = _run("ingest", tmp_path / "x.parquet", "--lake", tmp_path / "d", "--meta-column", "nope", "-q")
    _one_line_error(r, "no metadata column 'nope'")


def test_hive_partitioned_directory_with_partition_keys_as_metadata(tmp_path, table):
    t, unit = table
    pq.write_to_dataset(t, tmp_path / "hive", partition_cols=["lang"])
    (tmp_path / "hive" / "_SUCCESS").write_text("")                     # marker files are ignored
    r = _run("ingest", tmp_path / "hive", "--lake", tmp_path / "lake", "--label-column", "cls",
             "--meta-column", "lang", "--meta-column", "score", "-q")
    assert r.exit_code == 0, r.output
    assert f"ingested {N:,} rows x {DIM}" in r.output
    with open_lake(tmp_path / "lake") as lake:
        s = lake.splats()
        assert lake.version == 1
    # rows come partition by partition: match them back to the input by their score (unique per row)
    order = np.argsort(s["score"])
    np.testing.assert_allclose(s["mu"][order], unit, atol=1e-6)
    assert s["lang"][order].tolist() == t.column("lang").to_pylist()
    assert s["label"][order].tolist() == t.column("cls").to_pylist()


def _partition(path, k: str, vectors: np.ndarray, labels: list, **extra) -> None:
    (path / f"k={k}").mkdir(parents=True)
    cols = {"v": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
            "l": pa.array(labels), **extra}
    pq.write_table(pa.table(cols), path / f"k={k}" / "p.parquet")


def test_a_file_column_named_like_a_partition_key_is_refused(tmp_path):
    # observed: files lab=a/p.parquet holding their own column "lab" were stored with the folders' values
    # ("a", "b") as labels and the files' values dropped, silently (pyarrow gives the partition precedence)
    v = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    for k in ("a", "b"):
        (tmp_path / "src" / f"k={k}").mkdir(parents=True)
        pq.write_table(pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), 4),
                                 "k": pa.array(["file-value"] * 3)}), tmp_path / "src" / f"k={k}" / "p.parquet")
    r = _run("ingest", tmp_path / "src", "--lake", tmp_path / "lake", "--label-column", "k", "-q")
    _one_line_error(r, "has a column 'k', which is also a partition key of its folders (k=...)")
    assert not (tmp_path / "lake").exists()


def test_hive_partitions_with_wider_types_keep_their_values(tmp_path):
    # observed (a probing user, 2026-12-07): every file was read with the first file's schema: the second
    # partition's float64 vectors were rounded to float16 (max error 9.6e-4), silently
    g = np.random.default_rng(0)
    a, b = g.standard_normal((20, 8)).astype(np.float16), g.standard_normal((30, 8))
    _partition(tmp_path / "src", "a", a, list(range(20)))
    _partition(tmp_path / "src", "b", b, list(range(30)))
    r = _run("ingest", tmp_path / "src", "--lake", tmp_path / "lake", "--label-column", "l", "--meta-column", "k",
             "-q")
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "lake") as lake:
        got = lake.to_arrow(original=True)
    k = np.array(got["k"].to_pylist())
    mu = np.stack(got["mu"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(mu[k == "b"], b.astype(np.float32), rtol=1e-6)   # not float16's 1e-3
    np.testing.assert_allclose(mu[k == "a"], a.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("case", ["label types", "columns"])
def test_hive_partitions_that_disagree_are_refused_naming_them(tmp_path, case):
    # observed: int labels of the second partition stored as the strings '0', '1', ...; a column only the
    # second partition has dropped without a word with --all-columns
    g = np.random.default_rng(0)
    _partition(tmp_path / "src", "a", g.standard_normal((5, 8)), ["x"] * 5)
    if case == "label types":
        _partition(tmp_path / "src", "b", g.standard_normal((5, 8)), list(range(5)))
        args, needle = ("--label-column", "l"), "column 'l' has types that differ between its files"
    else:
        _partition(tmp_path / "src", "b", g.standard_normal((5, 8)), ["y"] * 5, e=pa.array(range(5)))
        args, needle = ("--all-columns",), "has a column 'e' that"
    r = _run("ingest", tmp_path / "src", "--lake", tmp_path / "lake", *args, "-q")
    assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "lake").exists()


def test_hive_partitions_differing_only_in_unread_columns_or_holding_stray_files_still_ingest(tmp_path):
    # (found in review) the unification looked at every column and every file: an unread column of another
    # type, or a notes.txt beside the data, was refused where the ingest had worked
    g = np.random.default_rng(0)
    _partition(tmp_path / "src", "a", g.standard_normal((5, 8)), ["x"] * 5, note=pa.array(["n"] * 5))
    _partition(tmp_path / "src", "b", g.standard_normal((5, 8)), ["y"] * 5, note=pa.array(range(5)))
    (tmp_path / "src" / "k=b" / "notes.txt").write_text("not data")
    r = _run("ingest", tmp_path / "src", "--lake", tmp_path / "lake", "--label-column", "l", "-q")
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "lake") as lake:
        assert len(lake) == 10


def test_hive_int64_and_float_partitions_of_one_column_are_refused_not_rounded(tmp_path):
    g = np.random.default_rng(0)
    _partition(tmp_path / "src", "a", g.standard_normal((2, 8)), ["x"] * 2, m=pa.array([2**53 + 1, 3]))
    _partition(tmp_path / "src", "b", g.standard_normal((2, 8)), ["y"] * 2, m=pa.array([0.5, 1.5]))
    r = _run("ingest", tmp_path / "src", "--lake", tmp_path / "lake", "--meta-column", "m", "-q")
    assert r.exit_code == 1 and "column 'm' is int64 in some files" in r.output, r.output


def _check(lake, unit, t, with_meta=True):
    s = lake.splats()
    np.testing.assert_allclose(s["mu"], unit, atol=1e-6)
    assert s["label"].tolist() == t.column("cls").to_pylist()
    if with_meta:
        assert s["lang"].tolist() == t.column("lang").to_pylist()


def _stream_kinds(t):
    pl = pytest.importorskip("polars")
    batches = t.to_batches(max_chunksize=128)
    return {
        "table": lambda: t,
        "record_batch": lambda: t.combine_chunks().to_batches()[0],
        "reader": lambda: pa.RecordBatchReader.from_batches(t.schema, batches),
        "generator": lambda: (b for b in batches),
        "list": lambda: list(batches),
        "polars": lambda: pl.from_arrow(t),
    }


@pytest.mark.parametrize("kind", ["table", "record_batch", "reader", "generator", "list", "polars"])
def test_add_splats_from_arrow_data(tmp_path, table, kind):
    t, unit = table
    data = _stream_kinds(t)[kind]()
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=DIM)) as lake:
        ids = lake.add_splats(data, labels="cls", metadata=["lang"])
        assert ids.tolist() == list(range(N)) and lake.version == 1
        _check(lake, unit, t)


def test_wide_numeric_frames_stay_arrays(tmp_path):
    """A pandas or Polars frame of numeric columns (one column per dimension) is still a [rows, dim] array."""
    pl = pytest.importorskip("polars")
    pd = pytest.importorskip("pandas")
    x = np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32)
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=DIM)) as lake:
        lake.add_splats(pl.DataFrame(x))
        lake.add_splats(pd.DataFrame(x))
        mu = lake.splats()["mu"]
    np.testing.assert_allclose(mu, np.concatenate([x, x]) / np.linalg.norm(np.concatenate([x, x]), axis=1,
                                                                          keepdims=True), atol=1e-6)


def test_add_table_from_hf_dataset(tmp_path, table, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t, unit = table
    ds = datasets.Dataset(t)
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=DIM)) as lake:
        lake.add_table(ds, label_column="cls", all_columns=True, chunk_bytes=10_000)
        _check(lake, unit, t)
        assert set(lake.manifest.metadata) == {"lang", "score"}
    picked = ds.select(range(10, 20))          # an index mapping: the selected rows, not the first ten
    with create_m2m(M2MConfig(path=tmp_path / "lake2", latent_dim=DIM)) as lake:
        lake.add_splats(picked, labels="cls")
        np.testing.assert_allclose(lake.splats()["mu"], unit[10:20], atol=1e-6)


def test_table_input_errors(tmp_path, table):
    t, _ = table
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=DIM)) as lake:
        with pytest.raises(InvalidEmbeddingError, match="kappa/alpha do not apply"):
            lake.add_splats(t, kappa=np.ones(N))
        with pytest.raises(InvalidEmbeddingError, match="no label column 'nope'"):
            lake.add_splats(t, labels="nope")
        gen = (b for b in t.to_batches())
        bad = t.to_batches()[0].to_pandas()
        with pytest.raises(InvalidEmbeddingError, match="expected Arrow record batches"):
            lake.add_splats(iter([bad]))
        assert len(lake) == 0 and lake.version == 0 and gen is not None


def test_chunks_are_sized_in_bytes_and_read_once(tmp_path, table):
    t, _ = table
    pq.write_table(t, tmp_path / "x.parquet", row_group_size=400)
    src = open_source(tmp_path / "x.parquet", chunk_bytes=DIM * 4 * 100)     # 100 rows of float32 per chunk
    assert src.dim() == DIM and src.rows() == N
    sizes = [len(c["vectors"]) for c in src.chunks()]
    assert sum(sizes) == N and max(sizes) == 100
    empty = tmp_path / "empty.parquet"
    pq.write_table(t.slice(0, 0), empty)
    assert open_source(empty).dim() == DIM               # from the fixed_size_list type: no row needed
    calls = []

    def chunks():
        calls.append(1)
        return src.chunks()

    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=DIM)) as lake:
        lake.add_splat_chunks(chunks)
    assert len(calls) == 1                               # one pass: validated and written as it is read


@pytest.mark.parametrize("fmt", ["npy", "parquet", "arrow"])
def test_empty_inputs_are_one_line(tmp_path, table, fmt):
    t, _ = table
    f = tmp_path / f"empty.{fmt}"
    if fmt == "npy":
        np.save(f, np.zeros((0, DIM), np.float32))
    elif fmt == "parquet":
        pq.write_table(t.slice(0, 0), f)
    else:
        with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, t.schema):
            pass
    r = _run("ingest", f, "--lake", tmp_path / "lake", "-q")
    _one_line_error(r, str(f), "no rows")
    np.save(tmp_path / "flat.npy", np.zeros(0, np.float32))
    _one_line_error(_run("ingest", tmp_path / "flat.npy", "--lake", tmp_path / "lake", "-q"), "flat.npy", "shape (0,)")


@pytest.mark.parametrize("fmt", ["npy", "parquet", "arrow"])
def test_truncated_inputs_name_the_file(tmp_path, table, fmt):
    t, _ = table
    f = tmp_path / f"x.{fmt}"
    if fmt == "npy":
        np.save(f, np.ones((N, DIM), np.float32))
    elif fmt == "parquet":
        pq.write_table(t, f)
    else:
        with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    r = _run("ingest", f, "--lake", tmp_path / "lake", "-q")
    _one_line_error(r, str(f), "truncated or corrupt")
    assert not (tmp_path / "lake" / "_data").exists() or os.listdir(tmp_path / "lake" / "_data") == []


def test_out_of_space_names_the_lake_folder(tmp_path):
    """A file-size limit (EFBIG, like ENOSPC an OSError without a file name) hit while writing shards."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4000, 128)).astype(np.float32))
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from m2m.cli.main import cli\n"
        f"cli(['ingest', {str(tmp_path / 'x.npy')!r}, '--lake', {str(tmp_path / 'lake')!r}, '-q'], prog_name='m2m')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{tmp_path / 'lake'}/_data" in r.stderr                      # the folder (or the file in it)
    assert not (tmp_path / "lake").exists()  # a failed first ingest removes the empty lake it made


@pytest.mark.parametrize("second", ["swapped", "missing"])
def test_a_directory_ingests_one_vector_column_for_all_its_files(tmp_path, second):
    # observed: without --column the vector column was picked per file ("the first list column"): a second
    # file listing another list column first ingested that column as its vectors, silently
    rng = np.random.default_rng(5)

    def fsl(x):
        return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel().astype(np.float32)), x.shape[1])

    src = tmp_path / "src"
    src.mkdir()
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    pq.write_table(pa.table({"emb": fsl(a), "aux": fsl(np.ones((5, 4)))}), src / "a.parquet")
    other = {"aux": fsl(np.ones((5, 4))), "emb": fsl(b)} if second == "swapped" else {"other": fsl(b)}
    pq.write_table(pa.table(other), src / "b.parquet")
    result = CliRunner().invoke(cli, ["ingest", str(src), "--lake", str(tmp_path / "lake"), "-q"])
    if second == "missing":
        assert result.exit_code != 0 and "no column 'emb'" in result.output and "b.parquet" in result.output
        return
    assert result.exit_code == 0, result.output
    mu = np.stack(open_lake(str(tmp_path / "lake")).to_arrow()["mu"].to_numpy(zero_copy_only=False))
    want = np.concatenate([a, b]) / np.linalg.norm(np.concatenate([a, b]), axis=1, keepdims=True)
    np.testing.assert_allclose(mu, want, atol=1e-6)


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_shard_buffers_follow_the_rows_written_not_shard_bytes(tmp_path, storage):
    # observed: a 3-row ingest with --shard-size 64GiB allocated shard buffers of 32 GiB (MemoryError and
    # a traceback); buffers now start at the rows in sight and double up to a shard as it fills
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "x.npy"), "--lake", str(tmp_path / "big"), "-q",
                                      "--shard-size", "64GiB", "--dtype", storage])
    assert result.exit_code == 0, result.output
    # many small chunks growing one shard, then shards of several sizes: the same rows as one batch
    y = rng.normal(size=(5000, 8))
    chunks = [y[i:i + 37] for i in range(0, len(y), 37)]
    for shard_bytes in (1 << 16, 100_000, 1 << 36):
        cfg = M2MConfig(path=tmp_path / f"lake-{shard_bytes}", latent_dim=8, shard_bytes=shard_bytes,
                        storage_dtype=storage)
        with create_m2m(cfg) as lake:
            lake.add_splat_chunks(lambda: ({"vectors": c} for c in chunks))
            got = np.stack(lake.to_arrow(original=True)["mu"].to_numpy(zero_copy_only=False))
            tol = 1e-6 if storage == "float32" else 1e-3
            np.testing.assert_allclose(got, y, rtol=tol, atol=tol)
            assert len(lake) == 5000 and (shard_bytes > 1 << 30) == (len(lake.manifest.shards) == 1)


@pytest.mark.parametrize("role", ["labels", "metadata", "cli"])
def test_a_polars_categorical_column_is_ingested_as_strings(tmp_path, role):
    # observed: Polars sends Categorical as dictionary<uint32, string_view>; decoding it raised pyarrow's
    # ArrowNotImplementedError ("array_take has no kernel ... string_view") at the user, a traceback in the CLI
    pl = pytest.importorskip("polars")
    words = ["cat", "dog", "cat", "cow", "dog", "cat"]
    df = pl.DataFrame({"v": np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32),
                       "cls": words}).with_columns(pl.col("cls").cast(pl.Categorical))
    path = tmp_path / "lake"
    if role == "cli":
        df.write_ipc(tmp_path / "cat.arrow")
        result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "cat.arrow"), "--lake", str(path),
                                          "--label-column", "cls", "-q"])
        assert result.exit_code == 0, result.output
        assert open_lake(str(path)).to_arrow()["label"].to_pylist() == words
        return
    with create_m2m(M2MConfig(path=path, latent_dim=4)) as lake:
        lake.add_splats(df, **({"labels": "cls"} if role == "labels" else {"metadata": ["cls"]}))
        assert lake.to_arrow()["label" if role == "labels" else "cls"].to_pylist() == words


@pytest.mark.parametrize("col, message", [
    (pa.array([["a", "b"], ["c", "d"]]), "holds lists of string, not numbers"),
    (pa.array([[], []], type=pa.list_(pa.float32())), "holds empty lists"),
])
def test_a_vector_column_of_strings_or_empty_lists_is_named(tmp_path, col, message):
    # observed: pyarrow's "Non-fixed width type" and numpy's "cannot reshape array of size 0" (raw ValueErrors)
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=2)) as lake:
        with pytest.raises(InvalidEmbeddingError, match=f"column 'v' {message}"):
            lake.add_splats(pa.table({"v": col}))


def _two_files(src, layout: str, name: str, first: pa.Array, then: pa.Array) -> None:
    """Files ``a`` and ``b`` of two rows each (8-wide vectors), column ``name`` holding ``first`` and
    ``then``: in ``src`` (``layout="flat"``) or in its partition folders ``p=a``/``p=b``."""
    g = np.random.default_rng(0)
    for part, col in (("a", first), ("b", then)):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(g.standard_normal(2 * 8).astype(np.float32)), 8)
        where = src / f"p={part}" if layout == "partitioned" else src
        where.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"embedding": vec, name: col}), where / f"{part}.parquet")


@pytest.mark.parametrize("layout", ["flat", "partitioned"])
@pytest.mark.parametrize("first, then, wide", [
    (pa.array([1, 2], pa.int32()), pa.array([2**40, 3], pa.int64()), pa.int64()),
    (pa.array([1, 2], pa.uint8()), pa.array([-5, 3], pa.int8()), pa.int16()),
    (pa.array([1.5, 2], pa.float16()), pa.array([1e10, 3], pa.float32()), pa.float32()),
])
def test_a_metadata_column_whose_type_differs_between_files_is_widened_in_either_layout(tmp_path, layout, first,
                                                                                         then, wide):
    # observed (a probing user, 2026-12-07): a flat directory was read file by file against the first
    # file's type (2**40 refused for int32; int8 -5 for uint8 in Arrow's words, 251) while the same files
    # in partition folders were widened
    src = tmp_path / "src"
    _two_files(src, layout, "x", first, then)
    r = _run("ingest", src, "--lake", tmp_path / "lake", "--meta-column", "x", "-q")
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "lake") as lake:
        got = lake.to_arrow()
    assert got.schema.field("x").type == wide
    assert got["x"].to_pylist() == first.cast(wide).to_pylist() + then.cast(wide).to_pylist()


def _flat_files(src, cols_per_file) -> None:
    g = np.random.default_rng(1)
    src.mkdir(parents=True, exist_ok=True)
    for i, extra in enumerate(cols_per_file):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(g.standard_normal(2 * 8).astype(np.float32)), 8)
        pq.write_table(pa.table({"embedding": vec, **extra}), src / f"f{i:04d}.parquet")


@pytest.mark.parametrize("layout", ["flat", "partitioned"])
def test_a_string_column_dictionary_encoded_in_some_files_is_read_as_strings(tmp_path, layout):
    # a pandas category in one file, plain strings in the next (refused by the widening rule, review 2026-12-07)
    src = tmp_path / "src"
    _two_files(src, layout, "m", pa.array(["x", "y"]), pa.array(["z", "x"]).dictionary_encode())
    r = _run("ingest", src, "--lake", tmp_path / "lake", "--meta-column", "m", "-q")
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "lake") as lake:
        assert lake.to_arrow()["m"].to_pylist() == ["x", "y", "z", "x"]


def test_a_flat_directory_keeps_checking_values_where_types_have_no_lossless_widening(tmp_path):
    # int64 then float64 holding whole numbers: no lossless common type, so each file's values are checked
    # against the column as they come (as before the widening); the partitioned layout must pick one type
    _flat_files(tmp_path / "src", [{"x": pa.array([1, 2], pa.int64())}, {"x": pa.array([3.0, 4.0])}])
    r = _run("ingest", tmp_path / "src", "--lake", tmp_path / "lake", "--meta-column", "x", "-q")
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "lake") as lake:
        assert lake.to_arrow()["x"].to_pylist() == [1, 2, 3, 4]


def test_widening_a_flat_directory_holds_one_file_open_at_a_time(tmp_path):
    # every file's reader was kept while the types were unified: 1,000 files hit the open-file limit,
    # reported as a corrupt file
    _flat_files(tmp_path / "src", [{"x": pa.array([i, i], pa.int32() if i % 2 else pa.int64())} for i in range(120)])
    code = ("import resource, os, sys\nfrom m2m.cli.main import main\n"
            "used = len(os.listdir('/proc/self/fd'))\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (used + 40, used + 40))\n"
            f"sys.argv = ['m2m', 'ingest', {str(tmp_path / 'src')!r}, '--lake', {str(tmp_path / 'lake')!r}, "
            "'--meta-column', 'x', '-q']\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with open_lake(tmp_path / "lake") as lake:
        assert len(lake) == 240 and lake.to_arrow().schema.field("x").type == pa.int64()


@pytest.mark.parametrize("kind", ["npy", "parquet"])
def test_a_directory_whose_files_differ_in_width_names_the_file(tmp_path, kind):
    # the lake's own check said "vectors have dimension 9, expected latent_dim 8": which of the files?
    rng = np.random.default_rng(6)
    src = tmp_path / "src"
    src.mkdir()
    for name, width in (("a", 8), ("b", 8), ("c", 9)):
        x = rng.normal(size=(4, width)).astype(np.float32)
        if kind == "npy":
            np.save(src / f"{name}.npy", x)
        else:
            pq.write_table(pa.table({"embedding": list(x)}), src / f"{name}.parquet")
    result = CliRunner().invoke(cli, ["ingest", str(src), "--lake", str(tmp_path / "lake"), "-q"])
    assert result.exit_code == 1
    assert f"c.{kind}: vectors have dimension 9, the first file {src / f'a.{kind}'} has 8" in result.output
    assert not (tmp_path / "lake").exists()
