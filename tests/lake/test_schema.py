"""Issue 11 item 3: one registry of reserved column names; labels must be int64-representable ints or strings."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from m2m import M2MConfig, create_m2m
from m2m.errors import InvalidEmbeddingError
from m2m.lake.schema import RESERVED_COLUMNS

D = 8


def _state(lake) -> tuple:  # type: ignore[no-untyped-def,type-arg]
    return lake.version, len(lake), sorted(p.name for p in (Path(lake.path) / "_data").iterdir())


@pytest.fixture
def lake(tmp_path: Path):  # type: ignore[no-untyped-def]
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D, knn_k=4)) as lk:
        yield lk


def test_neighbor_cos_metadata_is_refused_before_anything_is_written(lake) -> None:  # type: ignore[no-untyped-def]
    # observed: accepted, then silently replaced by the kNN cosines after estimate_kappa
    before = _state(lake)
    with pytest.raises(InvalidEmbeddingError, match="metadata column 'neighbor_cos' clashes with a reserved name"):
        lake.add_splats(np.eye(D), metadata={"neighbor_cos": np.arange(D, dtype=np.float32)})
    assert _state(lake) == before


@pytest.mark.parametrize("name", sorted(RESERVED_COLUMNS))
def test_every_reserved_name_is_refused(lake, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidEmbeddingError, match=f"metadata column '{name}'"):
        lake.add_splats(np.eye(D), metadata={name: np.arange(D)})


def test_every_column_m2m_produces_is_in_the_registry(lake) -> None:  # type: ignore[no-untyped-def]
    """The registry is complete: main files, sidecars, snapshot columns and stream batch keys."""
    from m2m.stream import columns as stream_columns

    g = np.random.default_rng(0)
    lake.add_splats(g.standard_normal((60, D)), labels=g.integers(0, 3, 60), metadata={"user_col": g.random(60)})
    lake.estimate_kappa(threads=1)
    lake.add_splats(g.standard_normal((5, D)), labels=g.integers(0, 3, 5), metadata={"user_col": g.random(5)})
    produced: set[str] = set()
    for f in lake.manifest.files():
        schema = pa.ipc.open_file(pa.memory_map(str(Path(lake.path) / f.path))).schema
        produced |= set(schema.names) | set(f.columns)
    produced |= set(lake.snapshot.column_names)
    produced |= {stream_columns.EMBEDDING, stream_columns.WEIGHT, stream_columns.ROWS}
    batch = next(iter(lake.export_to_dataloader(batch_size=8, columns=("embedding", "id", "kappa"),
                                                importance_sampling="alpha")))
    produced |= set(batch)
    assert produced - {"user_col"} <= RESERVED_COLUMNS, sorted(produced - {"user_col"} - RESERVED_COLUMNS)


def test_validate_uses_the_registry() -> None:
    import m2m._validate as v

    assert v.RESERVED_COLUMNS is RESERVED_COLUMNS


@pytest.mark.parametrize("labels, row, shown", [
    (np.array([1, 2**64 - 1], dtype=np.uint64), 1, "18446744073709551615"),   # observed: stored as -1
    (np.array([1.0, 2.0, 1e20]), 2, "1e+20"),                                  # observed: -9223372036854775808
    (np.array([1.0, 0.5]), 1, "0.5"),
    (np.array([np.nan, 1.0]), 0, "nan"),
    (np.array([1.0, np.inf]), 1, "inf"),
    (np.array([2.0 ** 63]), 0, "9.223372036854776e+18"),
    ([3, 2**70], 1, "1180591620717411303424"),
    (torch.tensor([1.0, 1.5]), 1, "1.5"),
    ([1, "a"], 1, "'a'"),
    ([1, None, 2], 1, "None"),                                                 # was: "row 0 is 1"
    (["a", None], 1, "None"),
    (np.array([4, 1.5, "x"], dtype=object), 1, "1.5"),
])
def test_bad_labels_name_the_first_bad_row_without_warnings(lake, labels, row: int, shown: str) -> None:  # type: ignore[no-untyped-def]
    n = len(labels)
    before = _state(lake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no numpy RuntimeWarning may leak
        with pytest.raises(InvalidEmbeddingError, match=re.escape(f"labels row {row} is {shown}")):
            lake.add_splats(np.eye(D)[:n] + 0.1, labels=labels)
    assert _state(lake) == before


@pytest.mark.parametrize("labels, want", [
    (np.array([-(2**63), 2**63 - 1]), [-(2**63), 2**63 - 1]),
    (np.array([2**63 - 1], dtype=np.uint64), [2**63 - 1]),
    (np.array([-(2.0**63), 3.0]), [-(2**63), 3]),
    ([True, False], [1, 0]),
    (np.array([7, 8], dtype=np.uint8), [7, 8]),
])
def test_int64_representable_labels_round_trip_exactly(lake, labels, want) -> None:  # type: ignore[no-untyped-def]
    n = len(want)
    lake.add_splats(np.eye(D)[:n] + 0.1, labels=labels)
    assert lake.splats()["label"].tolist() == want


_ALL_TYPES = {"b": np.arange(12) % 2 == 0, "i8": np.arange(12, dtype=np.int8), "u8": np.arange(12, dtype=np.uint8),
              "u16": np.arange(12, dtype=np.uint16), "u32": np.arange(12, dtype=np.uint32),
              "u64": np.arange(12, dtype=np.uint64), "i32": np.arange(12, dtype=np.int32),
              "f16": np.arange(12, dtype=np.float16), "f64": np.arange(12, dtype=np.float64),
              "s": np.array(["a", None] * 6, dtype=object), "ts": np.arange(12).astype("datetime64[ns]"),
              "d": np.arange(12).astype("datetime64[D]"), "td": np.arange(12).astype("timedelta64[ms]")}


@pytest.mark.parametrize("labels", [None, "int", "str"])
@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("geometry", [False, True])
def test_column_sample_from_the_manifest_matches_what_column_reads(tmp_path: Path, labels, storage,
                                                                   geometry) -> None:  # type: ignore[no-untyped-def]
    # a stream learns its columns' dtypes from the manifest (reading shard 0 downloaded it on every rank
    # of a remote lake): the manifest's answer must be what reading the column gives, for every type
    lab = {None: None, "int": np.arange(12) % 3, "str": np.array(["x", "y"] * 6)}[labels]
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D, knn_k=4, storage_dtype=storage)) as lake:
        lake.add_splats(np.random.default_rng(0).standard_normal((12, D)), labels=lab, metadata=_ALL_TYPES)
        if geometry:
            lake.estimate_kappa()
            lake.add_splats(np.random.default_rng(1).standard_normal((5, D)), labels=None if lab is None else lab[:5],
                            metadata={k: v[:5] for k, v in _ALL_TYPES.items()})  # a shard without geometry
        snap = lake.snapshot
        names = list(snap.column_names)
        assert ("neighbors" in names) == geometry and ("label" in names) == (labels is not None)
        for shard in range(len(snap.manifest.shards)):
            for name in names:
                got, read = snap.column_sample(name), snap.column(shard, name)
                assert got is not None, name
                assert (got.dtype, got.shape[1:]) == (read.dtype, read.shape[1:]), (name, shard)
        assert snap.column_sample("no-such-column") is None


_F16 = np.float16
_CASTS = [  # (the lake's column, an append's values, refused?) -- every append checked as a whole
    (np.array([True, False]), np.array([1, 5, 0]), "has type int64, the lake's column is bool"),
    (np.array([1, 2], _F16), np.array([1.0001, 1e6, 7e4]), r"row 1's 1000000.0 as inf \(beyond halffloat's range\)"),
    (np.array([1, 2], np.float32), np.array([0.1, 1e40]), r"row 1's 1e\+40 as inf"),
    (np.array(["2020-01-01"], "datetime64[D]"), np.array(["2020-01-03T00:00", "2020-01-03T13:45"], "datetime64[s]"),
     r"row 1's datetime.datetime\(2020, 1, 3, 13, 45\) as datetime.date\(2020, 1, 3\)"),
    (np.array(["a", "b"], dtype=object), np.array([1, 2, 3]), "has type int64, the lake's column is string"),
    # the row and what it would become (Arrow's own message named the value only, no row)
    (np.array([1, 2], np.int8), np.array([1, 300]), "the lake's column is int8, which would store row 1's 300 as 44"),
    (np.array([1, 2], np.int64), np.array([1.0, 2.5]), "the lake's column is int64, which would store row 1's 2.5 as 2"),
    (np.array([1, 2], np.int64), np.array([True]), "has type bool, the lake's column is int64"),
    # a negative int in an unsigned column, an int a float column cannot hold (Arrow's back-cast raised
    # its own error naming the wrapped value, 18446744073709551615, not the row; float16 rounded silently)
    (np.array([1, 2], np.uint64), np.array([0, 1, 2, -1]), "row 3's -1 as 18446744073709551615"),
    (np.array([1, 2], np.uint8), np.array([3, -5], np.int8), "row 1's -5 as 251"),
    (np.array([1, 2], _F16), np.array([2048, 2049]), r"row 1's 2049 as 2048.0 \(convert"),
    (np.array([1, 2], np.float64), np.array([2**53 + 1]), "row 0's 9007199254740993 as 9007199254740992.0"),
    # stored exactly (or rounded by a float column): accepted
    (np.array([1, 2], np.float32), np.array([2**25, -3, 16_777_216]), None),
    (np.array([1, 2], np.float32), np.array([0.1, 1e30, np.nan]), None),
    (np.array([1, 2], np.int64), np.array([3.0, -4.0]), None),
    (np.array([1, 2], np.int8), np.array([127, -128], np.int64), None),
    (np.array(["2020-01-01"], "datetime64[D]"), np.array(["2021-05-06T00:00"], "datetime64[s]"), None),
    (np.array(["2020-01-01T00:00"], "datetime64[ns]"), np.array(["2021-05-06T07:08:09"], "datetime64[s]"), None),
    (np.array(["a", "b"], dtype=object), np.array(["c", None], dtype=object), None),
]


@pytest.mark.parametrize("first, then, refused", _CASTS, ids=range(len(_CASTS)))
def test_an_append_of_another_type_is_stored_as_given_or_refused(tmp_path: Path, first, then, refused) -> None:
    # observed: only the first value was checked, then Arrow cast the column: ints stored as True in a
    # bool column, 1e6 as inf in a float16 one, a time of day dropped by a date column, ints as strings
    rng = np.random.default_rng(0)
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lake:
        lake.add_splats(rng.standard_normal((len(first), D)), metadata={"m": first})
        before = _state(lake)
        if refused:
            with pytest.raises(InvalidEmbeddingError, match=refused) as info:
                lake.add_splats(rng.standard_normal((len(then), D)), metadata={"m": then})
            assert "\n" not in str(info.value) and _state(lake) == before
            return
        lake.add_splats(rng.standard_normal((len(then), D)), metadata={"m": then})
        got = lake.to_arrow()["m"].to_pylist()[len(first):]
        want = pa.array(then.tolist() if then.dtype == object else then).cast(lake.to_arrow()["m"].type,
                                                                              safe=False).to_pylist()
        assert got == want or (np.isnan(got[-1]) and got[:-1] == want[:-1])


def test_pieces_of_another_int_type_in_one_shard_keep_every_value(tmp_path: Path) -> None:
    # one shard from two batches, uint64 then int64: numpy joined them as float64 and stored 2**60 + 1 as
    # 2**60, silently (a probing user, 2026-12-07)
    def batch(u: pa.Array) -> pa.RecordBatch:
        vec = pa.array(np.eye(D, dtype=np.float32)[: len(u)].tolist(), pa.list_(pa.float32()))
        return pa.record_batch({"embedding": vec, "u": u})

    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lake:
        lake.add_splats(iter([batch(pa.array([2**60 + 1, 3], pa.uint64())), batch(pa.array([5, 7], pa.int64()))]),
                        metadata=["u"])
        assert len(lake.manifest.shards) == 1
        t = lake.to_arrow()
        assert t.schema.field("u").type == pa.uint64() and t["u"].to_pylist() == [2**60 + 1, 3, 5, 7]
