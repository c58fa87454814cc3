"""Dates, timestamps and durations as metadata: what add_splats takes from numpy is what it takes from
an Arrow table (and `m2m ingest` of Parquet), every read path returns the values, and a stream
delivers their int64 counts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import InvalidEmbeddingError

D = 4
N = 300
RNG = np.random.default_rng(0)
DAYS = (np.datetime64("1900-01-01") + RNG.integers(0, 60_000, N)).astype("datetime64[D]")
TIMES = {"D": DAYS, "s": DAYS.astype("datetime64[s]") + RNG.integers(0, 86_400, N),
         "us": DAYS.astype("datetime64[us]") + RNG.integers(0, 10**9, N),
         "dur": RNG.integers(-10**6, 10**6, N).astype("timedelta64[ms]")}


def _vectors() -> np.ndarray:
    return RNG.standard_normal((N, D)).astype(np.float32)


@pytest.mark.parametrize("workers", [0, 2])
def test_time_columns_read_back_and_stream_as_int64_counts(tmp_path: Path, workers: int) -> None:
    # observed: a datetime64[D] column (stored as date32) committed, then take/lake[i]/splats/the stream
    # raised a raw ArrowInvalid, and once that was fixed the stream read its 4-byte days as 8-byte
    # values: wrong numbers, silently
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D, shard_bytes=1 << 16)) as lake:
        lake.add_splats(_vectors()[:150], metadata={k: v[:150] for k, v in TIMES.items()})
        lake.add_splats(_vectors()[150:], metadata={k: v[150:] for k, v in TIMES.items()})
        assert lake.manifest.metadata == {"D": "date32[day]", "s": "timestamp[s]", "us": "timestamp[us]",
                                          "dur": "duration[ms]"}
        ids = np.array([5, 299, 0, 151])
        got = lake.take(ids)
        for k, v in TIMES.items():
            assert np.array_equal(got[k], v[ids]) and got[k].dtype == v.dtype
            assert lake[7][k] == v[7]
            assert np.array_equal(lake.splats()[k], v)
        for shuffle in (False, True):
            dl = lake.export_to_dataloader(batch_size=64, shuffle=shuffle, num_workers=workers,
                                           columns=("id", *TIMES))
            seen = 0
            for b in dl:
                rows = b["id"].numpy()
                for k, v in TIMES.items():
                    assert np.array_equal(b[k].numpy(), v[rows].astype(np.int64)), k
                seen += len(rows)
            assert seen == N
        lake.compact()
        assert np.array_equal(lake.take(ids)["D"], DAYS[ids])
        assert lake.to_arrow()["D"].type == pa.date32()


def test_an_arrow_table_takes_the_time_columns_and_string_nulls_numpy_takes(tmp_path: Path) -> None:
    # observed: timestamps from numpy were accepted and the same column from Arrow/Parquet refused;
    # strings with None the other way round
    x = _vectors()
    strings = np.array(["a", None, "c"] * (N // 3), dtype=object)
    table = pa.table({"emb": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D),
                      "day": pa.array(DAYS), "s": pa.array(TIMES["s"]), "dur": pa.array(TIMES["dur"]),
                      "d64": pa.array(DAYS).cast(pa.date64()), "name": pa.array(strings.tolist())})
    pq.write_table(table, tmp_path / "x.parquet")
    with create_m2m(M2MConfig(path=tmp_path / "a", latent_dim=D)) as a:
        a.add_splats(table, metadata=["day", "s", "dur", "d64", "name"])
        with create_m2m(M2MConfig(path=tmp_path / "b", latent_dim=D)) as b:
            b.add_splats(x, metadata={"day": DAYS, "s": TIMES["s"], "dur": TIMES["dur"], "d64": DAYS,
                                      "name": strings})
            assert a.manifest.metadata == b.manifest.metadata
            for k in ("day", "s", "dur", "d64", "name"):
                assert a.to_arrow()[k].equals(b.to_arrow()[k]), k
    from click.testing import CliRunner

    from m2m.cli.main import cli

    r = CliRunner().invoke(cli, ["ingest", str(tmp_path / "x.parquet"), "--lake", str(tmp_path / "c"), "--all-columns",
                                 "--no-estimate-kappa", "-q"])
    assert r.exit_code == 0, r.output
    with open_lake(tmp_path / "c") as c:
        assert np.array_equal(c.splats()["day"], DAYS) and list(c.splats()["name"][:3]) == ["a", None, "c"]


@pytest.mark.parametrize("dtype", ["datetime64[Y]", "datetime64[M]", "datetime64[h]", "datetime64[ps]",
                                   "timedelta64[D]", "timedelta64[m]"])
def test_a_time_unit_arrow_cannot_store_is_refused_in_one_line(tmp_path: Path, dtype: str) -> None:
    # observed: a raw pyarrow ArrowNotImplementedError ("Unsupported datetime64 time unit")
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lake:
        with pytest.raises(InvalidEmbeddingError, match=rf"metadata\['t'\] has dtype {re.escape(dtype)}: Arrow stores"):
            lake.add_splats(np.ones((3, D)), metadata={"t": np.arange(3).astype(dtype)})
        assert len(lake) == 0


def test_table_nulls_and_zones_are_refused_naming_the_column(tmp_path: Path) -> None:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(3 * D, np.float32)), D)
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lake:
        with pytest.raises(InvalidEmbeddingError, match=r"'n' has 1 null rows \(row 1 is the first\)"):
            lake.add_splats(pa.table({"emb": emb, "n": pa.array([1, None, 3])}), metadata=["n"])
        with pytest.raises(InvalidEmbeddingError, match=r"'t' has type timestamp\[s, tz=UTC\]: timestamps are stored"):
            lake.add_splats(pa.table({"emb": emb, "t": pa.array([1, 2, 3], pa.timestamp("s", tz="UTC"))}),
                            metadata=["t"])
        assert len(lake) == 0


def test_nat_reads_back_as_nat_from_numpy_and_from_a_table(tmp_path: Path) -> None:
    t = np.array(["2020-01-01", "NaT", "2022-01-01"], dtype="datetime64[us]")
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(3 * D, np.float32)), D)
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lake:
        lake.add_splats(np.ones((3, D)), metadata={"t": t})
        lake.add_splats(pa.table({"emb": emb, "t": pa.array(t)}), metadata=["t"])
        got = lake.splats()["t"]
        assert np.array_equal(got, np.concatenate([t, t]), equal_nan=True) and lake.to_arrow()["t"].null_count == 2
