"""Data fidelity: every column type the lake accepts streams (or is refused at ingest with one line),
every rejected ingest input is one `M2MError` line naming the column and row, vectors are stored
losslessly (unit rows bit-exact, every row's norm kept), and `m2m export` never overwrites silently."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from m2m import M2MConfig, create_m2m, open_lake
from m2m.cli.main import cli
from m2m.errors import ConfigError, InvalidEmbeddingError, M2MError

DIM = 8
N = 300


def _lake(tmp_path, **kw):
    return create_m2m(M2MConfig(path=str(tmp_path / "lake"), latent_dim=DIM, **kw))


def _x(n=N, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _one_line(exc: BaseException, *needles: str) -> None:
    text = str(exc)
    assert isinstance(exc, M2MError), type(exc)
    assert "\n" not in text.strip(), text
    for n in needles:
        assert n in text, text


def _stream(lake, names, **kw):
    dl = lake.export_to_dataloader(batch_size=64, shuffle=False, columns=names, **kw)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in dl:
        for n in names:
            parts[n].append(b[n])
    return {n: torch.cat(v) for n, v in parts.items()}


# ------------------------------------------------------------------------------------------ column types
STREAMED = [  # (values, delivered torch dtype)
    (np.arange(N) % 2 == 0, torch.bool),
    (np.arange(N, dtype=np.uint8), torch.uint8),
    (np.arange(N, dtype=np.uint16) * 200, torch.int64),
    (np.arange(N, dtype=np.uint32) * 14_000_000, torch.int64),
    (np.arange(N, dtype=np.uint64) * np.uint64(2 ** 54), torch.int64),
    (np.arange(N, dtype=np.int8), torch.int64),
    (np.arange(N, dtype=np.int16), torch.int64),
    (np.linspace(0, 1, N).astype(np.float16), torch.float32),
]


@pytest.mark.parametrize("values,want", STREAMED, ids=lambda v: str(getattr(v, "dtype", v)))
def test_every_metadata_type_streams(tmp_path, values, want):
    with _lake(tmp_path) as lake:
        lake.add_splats(_x(), metadata={"m": values})
        for names in (("m",), ("embedding", "m"), ("embedding", "weight", "m", "id")):
            got = _stream(lake, names)["m"]
            assert got.dtype == want
            assert np.array_equal(got.numpy().astype(np.float64), values.astype(np.float64))
        s = lake.splats()["m"]
        assert s.dtype == values.dtype and np.array_equal(s, values)
        t = lake.to_arrow(columns=["m"]).column("m").to_numpy()
        assert np.array_equal(t, values)


def test_timestamps_stream_as_int64_counts(tmp_path):
    t = np.arange(N).astype("datetime64[s]")
    dt = (np.arange(N) * 3).astype("timedelta64[ms]")
    with _lake(tmp_path) as lake:
        lake.add_splats(_x(), metadata={"t": t, "dt": dt})
        got = _stream(lake, ("t", "dt"))
        assert got["t"].dtype == torch.int64 and np.array_equal(got["t"].numpy(), t.astype(np.int64))
        assert np.array_equal(got["dt"].numpy(), dt.astype(np.int64))
        s = lake.splats()
        assert s["t"].dtype == t.dtype and np.array_equal(s["t"], t)


def test_bool_metadata_survives_consolidate_and_workers(tmp_path):
    flag = np.arange(N) % 3 == 0
    x = _x()
    x[1] = x[0]   # one duplicate pair to merge
    with _lake(tmp_path) as lake:
        lake.add_splats(x, metadata={"flag": flag})
        lake.consolidate(0.9999)
        assert len(lake) == N - 1
        assert lake.splats()["flag"].dtype == bool
        got = _stream(lake, ("flag",), num_workers=1)["flag"]
        assert got.dtype == torch.bool and int(got.sum()) == int(np.delete(flag, 1).sum())


def test_uint64_beyond_int64_is_refused_at_ingest(tmp_path):
    values = np.arange(N, dtype=np.uint64)
    values[17] = np.uint64(2 ** 63 + 5)
    with _lake(tmp_path) as lake:
        with pytest.raises(InvalidEmbeddingError) as e:
            lake.add_splats(_x(), metadata={"big": values})
        _one_line(e.value, "metadata['big']", "row 17")
        assert len(lake) == 0


def test_string_columns_are_refused_in_columns_naming_to_arrow(tmp_path):
    with _lake(tmp_path) as lake:
        lake.add_splats(_x(), labels=np.array(["a", "b", "c"])[np.arange(N) % 3],
                        metadata={"lang": np.array(["en", "fr"])[np.arange(N) % 2]})
        with pytest.raises(ConfigError) as e:
            lake.export_to_dataloader(batch_size=8, columns=("embedding", "lang"))
        _one_line(e.value, "'lang'", "to_arrow()")


def test_string_labels_decode_with_a_documented_call(tmp_path):
    names = np.array(["cat", "dog", "eel"])
    labels = names[np.random.default_rng(1).integers(0, 3, N)]
    with _lake(tmp_path) as lake:
        lake.add_splats(_x(), labels=labels)
        assert sorted(lake.label_vocabulary) == ["cat", "dog", "eel"]
        codes = _stream(lake, ("label",))["label"]
        assert codes.dtype == torch.int64
        assert list(lake.decode_labels(codes)) == list(labels)
        assert list(lake.decode_labels(codes.numpy()[:5])) == list(labels[:5])
        with pytest.raises(ConfigError):
            lake.decode_labels([len(lake.label_vocabulary)])


def test_decode_labels_on_int_labels_is_a_clear_error(tmp_path):
    with _lake(tmp_path) as lake:
        lake.add_splats(_x(), labels=np.arange(N) % 4)
        assert lake.label_vocabulary == ()
        with pytest.raises(ConfigError) as e:
            lake.decode_labels([0, 1])
        _one_line(e.value, "int64")


# ------------------------------------------------------------------------------------------ ingest errors
@pytest.mark.parametrize("values,row", [
    (np.ones(N, dtype=np.complex128), "row 0"),
    ([b"ok"] * 5 + [b"\xff\xfe"] + [b"ok"] * (N - 6), "row 5"),
    (["ok"] * 7 + ["\ud800"] + ["ok"] * (N - 8), "row 7"),
    (np.array(["ok"] * 9 + ["a\udcff"] + ["ok"] * (N - 10)), "row 9"),
    ([1 + 2j] * N, "row 0"),
])
def test_rejected_metadata_is_one_line_naming_column_and_row(tmp_path, values, row):
    with _lake(tmp_path) as lake:
        with pytest.raises(InvalidEmbeddingError) as e:
            lake.add_splats(_x(), metadata={"col": values})
        _one_line(e.value, "metadata['col']", row)
        assert len(lake) == 0


@pytest.mark.parametrize("labels,row", [
    (["ok"] * 3 + ["\ud800"] + ["ok"] * (N - 4), "row 3"),
    ([b"ok"] * 4 + [b"\xc3"] + [b"ok"] * (N - 5), "row 4"),
])
def test_rejected_labels_are_one_line_naming_the_row(tmp_path, labels, row):
    with _lake(tmp_path) as lake:
        with pytest.raises(InvalidEmbeddingError) as e:
            lake.add_splats(_x(), labels=labels)
        _one_line(e.value, "labels", row)


def test_rejected_complex_vectors_are_one_line(tmp_path):
    with _lake(tmp_path) as lake:
        with pytest.raises(InvalidEmbeddingError) as e:
            lake.add_splats(_x().astype(np.complex64))
        _one_line(e.value, "complex")


def test_strings_over_the_shard_limit_split_shards(tmp_path, monkeypatch):
    from m2m.lake import writer

    monkeypatch.setattr(writer, "STRING_BYTES_PER_SHARD", 1000)
    text = np.array([f"{i:04d}" * 20 for i in range(N)], dtype=object)  # 80 bytes a row
    with _lake(tmp_path) as lake:
        lake.add_splats(_x(), labels=text, metadata={"t": text})
        assert len(lake.manifest.shards) >= N * 160 // 1000
        assert list(lake.splats()["t"]) == list(text)
        assert list(lake.splats()["label"]) == list(text)
        assert lake.verify() == []


def test_one_value_over_the_shard_limit_is_one_line(tmp_path, monkeypatch):
    from m2m.lake import writer

    monkeypatch.setattr(writer, "STRING_BYTES_PER_SHARD", 1000)
    text = np.array(["x"] * N, dtype=object)
    text[42] = "y" * 2000
    with _lake(tmp_path) as lake:
        with pytest.raises(InvalidEmbeddingError) as e:
            lake.add_splats(_x(), metadata={"t": text})
        _one_line(e.value, "metadata['t']", "row 42")
        assert len(lake) == 0


@pytest.mark.slow
def test_more_than_2gib_of_strings_in_one_shard(tmp_path):
    n = 2100
    big = "z" * (1 << 20)  # 1 MiB a row: 2.05 GiB in all, one shard by vector bytes
    with _lake(tmp_path) as lake:
        lake.add_splats(_x(n), metadata={"t": np.array([big] * n, dtype=object)})
        assert len(lake) == n and len(lake.manifest.shards) >= 2
        first = lake.to_arrow(columns=["t"], stream=True).read_next_batch().column("t")
        assert first[0].as_py() == big


@pytest.mark.parametrize("content,needle", [
    (bytes(range(256)) * 4, "not a .npy file"),
    (None, "Python objects"),
], ids=["random-bytes", "object-array"])
def test_garbage_npy_is_one_line(tmp_path, content, needle):
    f = tmp_path / "bad.npy"
    if content is None:
        np.save(f, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    else:
        f.write_bytes(content)
    r = CliRunner().invoke(cli, ["ingest", "--lake", str(tmp_path / "lake"), str(f)])
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert needle in r.output and "allow_pickle" not in r.output and str(f) in r.output


# ------------------------------------------------------------------------------------------ lossless vectors
def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    ia, ib = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
    return int(np.abs(ia - ib).max())


@pytest.mark.parametrize("d", [3, 8, 640])
@pytest.mark.parametrize("how", ["numpy", "torch"])
def test_unit_norm_rows_round_trip_bit_exact(tmp_path, d, how):
    x = np.random.default_rng(d).standard_normal((400, d)).astype(np.float32)
    if how == "numpy":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
    else:
        u = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
    with create_m2m(M2MConfig(path=str(tmp_path / "lake"), latent_dim=d)) as lake:
        lake.add_splats(u)
        assert np.array_equal(lake.splats()["mu"].view(np.int32), u.view(np.int32))
        mu = lake.to_arrow(columns=["mu"]).column("mu").combine_chunks().flatten().to_numpy().reshape(-1, d)
        assert np.array_equal(mu.view(np.int32), u.view(np.int32))
        streamed = _stream(lake, ("embedding",))["embedding"].numpy()
        assert np.array_equal(streamed.view(np.int32), u.view(np.int32))
        norms = lake.to_arrow(columns=["mu_norm"]).column("mu_norm").to_numpy()
        assert (norms == 1.0).all()


def test_non_unit_rows_round_trip_within_one_ulp(tmp_path):
    g = np.random.default_rng(5)
    x = (g.standard_normal((2000, DIM)) * g.lognormal(0, 3, (2000, 1))).astype(np.float32)
    x[:10] *= np.float32(1e-30)
    x[10:20] *= np.float32(1e30)
    with _lake(tmp_path) as lake:
        lake.add_splats(x)
        mu = lake.splats()["mu"]
        assert np.abs(np.linalg.norm(mu.astype(np.float64), axis=1) - 1).max() < 1e-6
        t = lake.to_arrow(original=True)
        back = t.column("mu").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
        assert back.dtype == np.float32
        assert _ulps(back, x) <= 1
        norms = t.column("mu_norm").to_numpy()
        assert np.allclose(norms, np.linalg.norm(x.astype(np.float64), axis=1), rtol=1e-12)


def test_original_vectors_from_float64_and_int_input(tmp_path):
    g = np.random.default_rng(6)
    x64 = g.standard_normal((50, DIM)) * 7.0
    with _lake(tmp_path) as lake:
        lake.add_splats(x64)
        lake.add_splats(np.arange(1, 50 * DIM + 1).reshape(50, DIM))
        back = lake.to_arrow(original=True).column("mu").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
        assert _ulps(back[:50], x64.astype(np.float32)) <= 1
        assert _ulps(back[50:], np.arange(1, 50 * DIM + 1, dtype=np.float32).reshape(50, DIM)) <= 1


def test_float16_storage_keeps_norms(tmp_path):
    x = _x() * 3
    with _lake(tmp_path, storage_dtype="float16") as lake:
        lake.add_splats(x)
        t = lake.to_arrow(original=True)
        back = t.column("mu").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
        assert back.dtype == np.float32
        assert np.allclose(back, x, rtol=2 ** -10, atol=0)


def test_norm_column_is_reserved_and_survives_consolidate(tmp_path):
    x = _x() * 5
    x[1] = x[0]
    with _lake(tmp_path) as lake:
        with pytest.raises(InvalidEmbeddingError) as e:
            lake.add_splats(x, metadata={"mu_norm": np.ones(N)})
        _one_line(e.value, "mu_norm")
        lake.add_splats(x)
        lake.consolidate(0.9999)
        back = lake.to_arrow(original=True).column("mu").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
        keep = np.delete(x, 1, axis=0)
        assert _ulps(back[1:], keep[1:]) <= 1
        assert np.allclose(back[0], x[0], rtol=1e-6)


def test_old_lakes_without_norms_still_read(tmp_path):
    import shutil
    from pathlib import Path

    src = Path(__file__).parents[1] / "fixtures" / "lake_v1"
    shutil.copytree(src, tmp_path / "v1")
    with open_lake(tmp_path / "v1") as lake:
        mu = lake.splats()["mu"]
        t = lake.to_arrow(original=True)
        back = t.column("mu").combine_chunks().flatten().to_numpy().reshape(-1, lake.dim)
        assert np.array_equal(back, mu.astype(np.float32))
        assert "mu_norm" not in t.column_names  # no shard of this lake kept norms


def test_export_original_cli(tmp_path):
    x = _x() * 4
    with _lake(tmp_path) as lake:
        lake.add_splats(x)
    out = tmp_path / "out.parquet"
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "lake"), str(out), "--original", "-q"])
    assert r.exit_code == 0, r.output
    t = pa.parquet.read_table(out)
    back = t.column("mu").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    assert _ulps(back, x) <= 1


# ------------------------------------------------------------------------------------------ export
def test_export_takes_its_format_from_the_suffix_and_refuses_an_unknown_one(tmp_path):
    import pyarrow.ipc as ipc

    with _lake(tmp_path) as lake:
        lake.add_splats(_x())
    lake_dir = str(tmp_path / "lake")
    for name in ("out.arrow", "out.feather", "out.ipc"):   # Arrow IPC files, not Parquet bytes under that name
        r = CliRunner().invoke(cli, ["export", lake_dir, str(tmp_path / name), "-q"])
        assert r.exit_code == 0, r.output
        assert ipc.open_file(str(tmp_path / name)).read_all().num_rows == N
    for name in ("out.pq", "out.parquet"):
        assert CliRunner().invoke(cli, ["export", lake_dir, str(tmp_path / name), "-q"]).exit_code == 0
        assert pa.parquet.read_table(tmp_path / name).num_rows == N
    r = CliRunner().invoke(cli, ["export", lake_dir, str(tmp_path / "out.csv"), "-q"])
    assert r.exit_code == 1 and "out.csv" in r.output and "--format" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "out.csv").exists()
    r = CliRunner().invoke(cli, ["export", lake_dir, str(tmp_path / "out.csv"), "--format", "parquet", "-q"])
    assert r.exit_code == 0 and pa.parquet.read_table(tmp_path / "out.csv").num_rows == N   # asked for


def test_export_refuses_an_existing_file_unless_force(tmp_path):
    with _lake(tmp_path) as lake:
        lake.add_splats(_x())
    out = tmp_path / "out.parquet"
    out.write_bytes(b"precious")
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "lake"), str(out), "-q"])
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1 and str(out) in r.output and "--force" in r.output
    assert out.read_bytes() == b"precious"
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "lake"), str(out), "-q", "--force"])
    assert r.exit_code == 0, r.output
    assert pa.parquet.read_table(out).num_rows == N
