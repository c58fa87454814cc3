"""Random access: lake[i], lake[i:j], lake[[...]] and lake.take(ids), bit-exact against the reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m import M2MConfig, create_m2m
from m2m.errors import PositionError, UnknownColumnError, UnknownIdError
from m2m.lake.access import reader_of
from m2m.lake.shard import BLOCK_BYTES

DIM = 24


def make(path, dtype: str = "float32", labels: str = "string", shards: int = 6, n: int = 50):
    lake = create_m2m(M2MConfig(path=str(path), latent_dim=DIM, storage_dtype=dtype, knn_k=4))
    rng = np.random.default_rng(1)
    for i in range(shards):
        lab = ([f"c{j % 4}" for j in range(n)] if labels == "string" else np.arange(n) % 5 if labels == "int"
               else None)
        lake.add_splats(rng.standard_normal((n, DIM)), labels=lab, kappa=rng.uniform(1, 100, n),
                        alpha=rng.uniform(0.5, 2, n),
                        metadata={"score": rng.standard_normal(n), "n": np.arange(n, dtype=np.int32) + i,
                                  "text": np.array([f"t{i}-{j}" for j in range(n)], dtype=object)})
    return lake


def reference(lake) -> dict[str, np.ndarray]:
    """What the reader returns, with mu in its stored dtype and string labels as strings."""
    snap = lake.snapshot
    out = {"id": snap.read_all("id"), "mu": snap.read_all("mu"), "kappa": snap.read_all("kappa"),
           "alpha": snap.read_all("alpha")}
    if lake.manifest.label_type is not None:
        out["label"] = lake.splats()["label"]
    for name in lake.manifest.metadata:
        out[name] = snap.read_all(name)
    return out


def check(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], pos: np.ndarray) -> None:
    d = got
    assert isinstance(d, dict)
    assert d.keys() == ref.keys()
    for k, v in ref.items():
        want = v[pos]
        if want.dtype == object:
            assert list(d[k]) == list(want), k
        else:
            assert d[k].dtype == want.dtype and d[k].shape == want.shape and d[k].tobytes() == want.tobytes(), k


@pytest.mark.parametrize("dtype,labels", [("float32", "string"), ("float16", "int"), ("float32", None)])
def test_positions_slices_and_ids_are_bit_exact(tmp_path, dtype, labels):
    with make(tmp_path / "lake", dtype, labels) as lake:
        ref = reference(lake)
        n = len(lake)
        rng = np.random.default_rng(0)
        for i in (0, 1, 49, 50, n - 1):
            row = lake[i]
            assert isinstance(row, dict) and row["id"] == ref["id"][i]
            assert row["mu"].dtype == np.dtype(dtype) and row["mu"].tobytes() == ref["mu"][i].tobytes()
            assert row["kappa"].tobytes() == ref["kappa"][i].tobytes() and row["alpha"] == ref["alpha"][i]
            assert row["text"] == ref["text"][i] and row["n"] == ref["n"][i]
            assert ("label" not in row) == (labels is None)
        check(lake[10:170], ref, np.arange(10, 170))
        check(lake[5:290:7], ref, np.arange(5, 290, 7))
        check(lake[290:], ref, np.arange(290, n))
        check(lake[n:n + 5], ref, np.arange(0))
        pos = rng.integers(0, n, 500)                       # random order, repeats
        check(lake[pos], ref, pos)
        check(lake[pos.tolist()], ref, pos)
        check(lake.take(ref["id"][pos]), ref, pos)
        assert lake.take([])["id"].size == 0 and lake.take([])["mu"].shape == (0, DIM)
        assert lake[3:6]["id"].tolist() == [3, 4, 5]
        assert set(lake.take([3], columns=("id", "mu"))) == {"id", "mu"}
        with pytest.raises(UnknownColumnError, match="'nope'"):
            lake.take([3], columns=("nope",))


def test_ids_after_consolidation_and_geometry(tmp_path):
    with make(tmp_path / "lake") as lake:
        lake.add_splats(lake.splats()["mu"][:30], labels=lake.splats()["label"][:30], kappa=np.full(30, 5.0),
                        metadata={k: v[:30] for k, v in lake.splats().items() if k in ("score", "n", "text")})
        lake.consolidate(similarity=0.999)   # the 30 copies merge: ids get gaps; geometry sidecars come
        ref = reference(lake)
        assert len(lake) == 300 and lake.manifest.geometry is not None
        ids = ref["id"]
        order = np.random.default_rng(2).permutation(len(ids))
        check(lake.take(ids[order]), ref, order)   # kappa from the sidecar, as the reader sees it
        missing = sorted(set(range(ids.max() + 2)) - set(ids.tolist()))
        with pytest.raises(UnknownIdError, match=f"id {missing[0]} is not in lake version {lake.version}"):
            lake.take([ids[0], missing[0], ids[1]])


def test_errors_are_one_line(tmp_path):
    with make(tmp_path / "lake", shards=2) as lake:
        n = len(lake)
        for bad in (n, n + 10, -1, -n):
            with pytest.raises(IndexError, match=f"position {bad} is out of range") as info:
                lake[bad]
            assert isinstance(info.value, PositionError) and "\n" not in str(info.value)
        with pytest.raises(PositionError, match="position -3"):
            lake[[0, -3]]
        with pytest.raises(PositionError, match="slice start -2"):
            lake[-2:]
        with pytest.raises(PositionError, match="slice step -1"):
            lake[::-1]
        with pytest.raises(PositionError, match="takes an int"):
            lake["a"]
        with pytest.raises(KeyError) as kinfo:
            lake.take([10 ** 9])
        assert isinstance(kinfo.value, UnknownIdError) and str(kinfo.value).count("\n") == 0
        with pytest.raises(UnknownIdError, match="id -1"):
            lake.take(-1)
        # what a clumsy user passes: each gets one line naming the value
        with pytest.raises(PositionError, match=r"got ndarray of dtype int64 and shape \(1, 1\)"):
            lake[np.array([[1]])]
        with pytest.raises(PositionError, match="got 1.5"):
            lake[1.5]
        with pytest.raises(UnknownIdError, match=r"1-D sequence of integers, got shape \(1, 1\)"):
            lake.take(np.array([[0]]))
        with pytest.raises(UnknownColumnError, match="not the string 'label'"):
            lake.take([0], columns="label")
        with pytest.raises(PositionError, match=f"one entry per row \\({n}\\), got 3"):
            lake[np.array([True, False, True])]


def test_a_boolean_mask_selects_rows_as_numpy_and_torch_do(tmp_path):
    with make(tmp_path / "lake", shards=3) as lake:
        n = len(lake)
        mask = np.random.default_rng(0).random(n) < 0.3
        got = lake[mask]
        want = lake[np.flatnonzero(mask)]
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in got)
        assert np.array_equal(lake[torch.from_numpy(mask)]["id"], want["id"])
        assert len(lake[np.zeros(n, dtype=bool)]["id"]) == 0


def test_reads_only_the_shards_and_blocks_it_needs(tmp_path):
    with make(tmp_path / "lake", shards=4, n=20_000) as lake:   # ~2 MB shards: 8 checksum blocks
        r = reader_of(lake)
        row = lake[2 * 20_000 + 17]
        assert row["id"] == 2 * 20_000 + 17
        opened = {f.path for f in r._files.values()}
        shard_files = {lake.snapshot.fs.local_path(f.path) for f in lake.manifest.shards[2].files}
        assert opened <= shard_files and opened
        read = sum(f.bytes_read for f in r._files.values())
        fixed = ("id", "mu", "kappa", "alpha", "score", "n")   # at most one checksum block each
        assert read <= len(fixed) * BLOCK_BYTES < 0.6 * sum(f.bytes for f in lake.manifest.shards[2].files)
        assert lake.take([3 * 20_000 + 1])["id"][0] == 60_001
        assert r._id_maps == {}   # appended shards: ids by arithmetic, no id column read


def test_reader_follows_the_handle_to_a_new_version(tmp_path):
    with make(tmp_path / "lake", shards=3) as lake:
        first = lake[149]
        lake.compact()
        assert lake[149]["mu"].tobytes() == first["mu"].tobytes()
        ids = lake.add_splats(np.ones((2, DIM)), labels=["x", "y"], kappa=[1, 2], alpha=[1, 1],
                              metadata={"score": [0.0, 1.0], "n": np.array([7, 8], np.int32), "text": ["a", "b"]})
        got = lake.take(ids)
        assert list(got["label"]) == ["x", "y"] and list(got["text"]) == ["a", "b"]
        assert lake[len(lake) - 1]["id"] == ids[-1]


def test_without_verify_reads_only_the_rows_bytes_are_read(tmp_path):
    from m2m import open_lake

    make(tmp_path / "lake", shards=2, n=20_000).close()
    with open_lake(str(tmp_path / "lake"), verify_reads=False) as lake, open_lake(str(tmp_path / "lake")) as ref:
        row = lake[20_017]
        r = reader_of(lake)
        assert sum(f.bytes_read for f in r._files.values()) <= 6 * DIM * 4   # a few rows' bytes, no block
        assert row["mu"].tobytes() == ref[20_017]["mu"].tobytes() and row["id"] == 20_017
        pos = np.random.default_rng(0).integers(0, len(lake), 300)
        check(lake[pos], reference(ref), pos)


def test_snapshot_positions_and_neighbours_without_the_whole_id_column(tmp_path, monkeypatch):
    # Snapshot.positions / the neighbours column map ids to positions from the manifest's id ranges:
    # appended shards (ids = their whole range) by arithmetic, reading no id column; shards with gaps
    # by a bitmap of the ids each holds (`m2m.lake.idmap.ShardIds`), never the whole-lake id column
    with make(tmp_path / "lake") as lake:
        snap = lake.snapshot
        reads = []
        column = type(snap).column
        monkeypatch.setattr(type(snap), "column", lambda self, s, name: (reads.append(name), column(self, s, name))[1])
        ids = np.arange(len(lake))[::-1] * 1 + 0
        assert snap.positions(ids).tolist() == list(range(len(lake)))[::-1]
        assert "id" not in reads and snap._ids is None           # appended shards: no id column read
        with pytest.raises(UnknownIdError, match=f"id {len(lake)} is not in lake version"):
            snap.positions(np.array([0, len(lake)]))
        monkeypatch.setattr(type(snap), "column", column)
        sp = lake.splats()
        mixed = np.concatenate([sp["mu"][:15], np.random.default_rng(5).standard_normal((15, DIM))])
        lake.add_splats(mixed, labels=sp["label"][:30], kappa=np.full(30, 5.0),
                        metadata={k: v[:30] for k, v in sp.items() if k in ("score", "n", "text")})
        lake.consolidate(similarity=0.999)            # copies merge: the new shard keeps 15 rows, with gaps
        lake.estimate_kappa()
        snap = lake.snapshot
        all_ids = snap.read_all("id")
        assert not all(e.id_max - e.id_min + 1 == e.rows for e in lake.manifest.shards)
        order = np.random.default_rng(4).permutation(len(all_ids))
        assert snap.positions(all_ids[order]).tolist() == order.tolist()
        assert snap._ids is None and snap._id_maps                  # no whole id column; maps of gapped shards
        gap = sorted(set(range(int(all_ids.max()))) - set(all_ids.tolist()))[0]
        with pytest.raises(UnknownIdError, match=f"id {gap} is not"):
            snap.positions(np.array([all_ids[0], gap]))
        stored = np.concatenate([snap._file_column(e.file_for("neighbors"), "neighbors")
                                 for e in lake.manifest.shards])
        want = np.where(stored >= 0, np.searchsorted(all_ids, stored), -1)
        want[(stored >= 0) & ~np.isin(stored, all_ids)] = -1
        assert np.array_equal(snap.read_all("neighbors"), want)


def test_a_uint64_id_beyond_int64_is_named_as_given(tmp_path):
    # observed: "id -1 is not in lake version 1" for np.uint64(2**64 - 1) (the value wrapped)
    import numpy as np

    from m2m import M2MConfig, create_m2m
    from m2m.errors import UnknownIdError

    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=4)) as lake:
        lake.add_splats(np.ones((3, 4)))
        with pytest.raises(UnknownIdError, match="id 18446744073709551615 is not in lake version 1"):
            lake.take(np.array([2**64 - 1], dtype=np.uint64))
        assert lake.take(np.array([2], dtype=np.uint64))["id"].tolist() == [2]


# ------------------------------------------------------------------ found by a probing helper (2026-12-07)
def test_an_index_holding_a_big_int_or_none_is_one_typed_line(tmp_path):
    # observed: AttributeError "'int' object has no attribute 'item'" (an object array of Python ints)
    from m2m.errors import M2MError

    with create_m2m(M2MConfig(path=str(tmp_path / "l"), latent_dim=4)) as lake:
        lake.add_splats(np.eye(4, dtype=np.float32))
        for key in ([2**70], [3, None]):
            with pytest.raises(M2MError) as exc:
                lake[key]
            assert isinstance(exc.value, (IndexError, ValueError, TypeError)) and "\n" not in str(exc.value)
            assert repr(key[0] if key[0] is not None else key[1])[:8] in str(exc.value) or "dtype object" in str(exc.value)


def test_decode_labels_refuses_codes_that_are_not_integers(tmp_path):
    # observed: [1.9] decoded as 'dog', [True] as 'dog', ['1'] as 'dog' (silently); [2**70] an OverflowError
    from m2m.errors import ConfigError

    with create_m2m(M2MConfig(path=str(tmp_path / "l"), latent_dim=4)) as lake:
        lake.add_splats(np.eye(4, dtype=np.float32), labels=["cat", "dog", "emu", "fox"])
        assert lake.decode_labels(torch.tensor([1, 3])).tolist() == ["dog", "fox"]
        assert lake.decode_labels(np.array([], dtype=np.int64)).tolist() == []
        for codes in ([1.9], torch.tensor([2.7]), [True], ["1"], [float("nan")], [2**70],
                      np.array([2**64 - 1], dtype=np.uint64)):
            with pytest.raises(ConfigError, match="label codes must be integers|outside the vocabulary"):
                lake.decode_labels(codes)


@pytest.mark.parametrize("bad", [True, 3.0, "3", -1])
def test_to_arrow_and_checkout_check_the_version_as_open_lake_does(tmp_path, bad):
    # observed: to_arrow(version=True) read version 1 silently; 3.0 a bare ValueError; '3' "has no version 3"
    from m2m.errors import ConfigError

    with create_m2m(M2MConfig(path=str(tmp_path / "l"), latent_dim=4)) as lake:
        for _ in range(3):
            lake.add_splats(np.eye(4, dtype=np.float32))
        for call in (lambda: lake.to_arrow(version=bad), lambda: lake.checkout(bad)):
            with pytest.raises(ConfigError, match="version"):
                call()
        assert lake.to_arrow(version=1).num_rows == 4


def test_original_vectors_at_the_edge_of_float32_come_back_finite(tmp_path):
    # observed: a finite float32 row holding FLT_MAX came back inf from to_arrow(original=True); a float64 row
    # of 1e300 (valid input) came back inf with no error
    from m2m.errors import InvalidEmbeddingError

    edge = np.array([[2139095039, 2138550387, 2137550307, 2130729404]], np.uint32).view(np.float32)
    with create_m2m(M2MConfig(path=str(tmp_path / "l"), latent_dim=4)) as lake:
        lake.add_splats(edge)
        got = np.asarray(lake.to_arrow(original=True).column("mu").combine_chunks().flatten()).reshape(1, 4)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, edge, rtol=2.0**-22)
    with create_m2m(M2MConfig(path=str(tmp_path / "m"), latent_dim=4)) as lake:
        lake.add_splats(np.array([[1e300, 0.0, 0.0, 1.0]]))
        with pytest.raises(InvalidEmbeddingError, match="beyond float32's range"):
            lake.to_arrow(original=True)
        assert lake.to_arrow().num_rows == 1
    # the other edge (found by a probe): float64 rows of 1e-50 came back all zeros, silently
    with create_m2m(M2MConfig(path=str(tmp_path / "s"), latent_dim=4)) as lake:
        lake.add_splats(np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]) * np.array([[1.0], [1e-50]]))
        with pytest.raises(InvalidEmbeddingError, match="below float32's range"):
            lake.to_arrow(original=True)
        assert lake.to_arrow().num_rows == 2


def test_an_empty_selection_has_the_dtypes_of_a_non_empty_one(tmp_path):
    # observed: lake[0:0] and take([]) gave object arrays for bool, date, timestamp and duration columns
    meta = {"flag": np.array([True, False]), "when": np.array(["2026-01-01", "2026-01-02"], dtype="datetime64[D]"),
            "ts": np.array([1, 2], dtype="datetime64[us]"), "dur": np.array([1, 2], dtype="timedelta64[s]"),
            "n": np.array([1, 2], dtype=np.int32), "s": np.array(["a", "b"], dtype=object)}
    with create_m2m(M2MConfig(path=str(tmp_path / "l"), latent_dim=4)) as lake:
        lake.add_splats(np.eye(4, dtype=np.float32)[:2], metadata=meta)
        full, empty, taken = lake[0:1], lake[0:0], lake.take([])
        for name in meta:
            assert empty[name].dtype == full[name].dtype == taken[name].dtype, name


def test_integer_scalars_of_numpy_and_torch_are_positions(tmp_path):
    """A 0-d tensor or array and tensor slice bounds were refused ("lake[...] takes an int")."""
    lake = make(tmp_path / "l", shards=2, n=10)
    ids = lake.snapshot.read_all("id")
    for key in (torch.tensor(3), np.array(3), np.int16(3)):
        assert lake[key]["id"] == ids[3]
    assert list(lake[torch.tensor(2):np.int64(5)]["id"]) == list(ids[2:5])
    for key in (torch.tensor([3]), np.array([3]), [3]):  # one-element sequences are still batches
        assert lake[key]["mu"].shape == (1, DIM) and list(lake[key]["id"]) == [ids[3]]
    with pytest.raises(PositionError):
        lake[torch.tensor([[3]])]
    for key in (torch.tensor(True), np.array(True), 1.0, torch.tensor(2.0)):
        with pytest.raises(PositionError, match="takes an int"):
            lake[key]


@pytest.mark.parametrize("key, value", [([2**70], 2**70), ([1, 2**63], 2**63), ((0, -(2**64)), -(2**64))])
def test_python_ints_beyond_int64_in_a_list_are_named(tmp_path, key, value):
    """numpy made such lists float64 or object, and the error named the dtype, not the value."""
    lake = make(tmp_path / "l", shards=1, n=10)
    with pytest.raises(PositionError, match=f"position {value} is out of range"):
        lake[key]
    with pytest.raises(UnknownIdError, match=f"id {value} is not in lake"):
        lake.take(key)
