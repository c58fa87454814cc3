"""Issue 11 item 1: manifest v2 checksum, cross-checks against the Arrow footers, recovery.

Each test reproduces one observed failure first (the numbers of the issue: 3 shards of 1,000 rows).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import CorruptShardError, LakeNotFoundError, M2MError
from m2m.lake.manifest import INLINE_FORMAT_VERSION, Manifest, manifest_checksum
from m2m.lake.recovery import repair, rollback
from tests.lake.manifest_edit import edit_manifest, manifest_path

D = 8


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m2m.cli.main", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def lake3(tmp_path: Path) -> Path:
    """3 shard files of 1,000 rows (ids 0..2999), labels and a metadata column."""
    path = tmp_path / "lake"
    g = np.random.default_rng(0)
    with create_m2m(M2MConfig(path=path, latent_dim=D)) as lake:
        for i in range(3):
            lake.add_splats(g.standard_normal((1000, D)), labels=g.integers(0, 5, 1000),
                            metadata={"score": g.random(1000)})
    return path


def reference(path: Path, version: int | None = None) -> dict[str, np.ndarray]:
    with open_lake(path, version=version) as lake:
        return lake.splats()


def test_new_manifests_are_format_2_with_a_checksum(lake3: Path) -> None:
    doc = json.loads(manifest_path(lake3).read_text())
    assert doc["format_version"] == INLINE_FORMAT_VERSION == 2  # a small lake; format 3 beyond one segment
    assert doc["rows"] == 3000
    assert doc["checksum"] == manifest_checksum(doc) and doc["checksum"].startswith("sha256:")


@pytest.mark.parametrize("rechecksum", [False, True])
@pytest.mark.parametrize("as_format_1", [False, True])
def test_rows_1000_to_900_is_caught(lake3: Path, rechecksum: bool, as_format_1: bool) -> None:
    # observed: verify printed "ok: 3 files, 2,900 rows", reads dropped 100 rows silently
    edit_manifest(lake3, lambda d: d["shards"][1].update(rows=900), rechecksum=rechecksum, as_format_1=as_format_1)
    with pytest.raises(CorruptShardError) as exc:
        open_lake(lake3)
    msg = str(exc.value)
    if as_format_1:   # a format-2 lake rewritten as format 1 (no checksum, no total): a downgrade
        assert "format_version 1" in msg
    elif rechecksum:  # a writer bug: the total no longer matches the shards
        assert "rows = 3000 but the shards hold 2900" in msg
    else:
        assert "checksum mismatch" in msg and "v0000000003.json" in msg
    r = cli("verify", "-q", str(lake3))
    assert r.returncode == 1 and "ok:" not in r.stdout
    assert "900" in r.stderr or "checksum" in r.stderr


@pytest.mark.parametrize("as_format_1", [False, True])
def test_next_id_lowered_is_refused_before_any_append(lake3: Path, as_format_1: bool) -> None:
    # observed: next_id 5 made the next append return ids [5, 6] (duplicates) and verify said ok
    edit_manifest(lake3, lambda d: d.update(next_id=5), as_format_1=as_format_1)
    match = "format_version 1" if as_format_1 else "next_id 5 is not above the largest id 2999"
    with pytest.raises(CorruptShardError, match=match):
        open_lake(lake3)
    with pytest.raises(CorruptShardError, match=match):
        create_m2m(M2MConfig(path=lake3, latent_dim=D))
    assert cli("verify", "-q", str(lake3)).returncode == 1


@pytest.mark.parametrize("as_format_1", [False, True])
def test_rows_1000_to_1100_is_a_corrupt_shard_error_not_index_error(lake3: Path, as_format_1: bool) -> None:
    edit_manifest(lake3, lambda d: d["shards"][0].update(rows=1100), as_format_1=as_format_1)
    match = "format_version 1" if as_format_1 else "rows = 3000 but the shards hold 3100"
    with pytest.raises(CorruptShardError, match=match):
        open_lake(lake3)


@pytest.mark.parametrize("change, match", [
    (lambda d: d["shards"][2].update(id_min=1999), "ids start at 1999"),
    (lambda d: d["shards"][1].update(id_max=1998, id_min=999), "ids start at 999"),
    (lambda d: d["shards"][0]["files"][0].update(bytes=d["shards"][0]["files"][0]["bytes"] + 1), "bytes"),
    (lambda d: d.update(dim=9), "column 'mu' is fixed_size_list"),
    (lambda d: d.update(dtype="float16"), "column 'mu' is fixed_size_list"),
    (lambda d: d["shards"].reverse(), "not after the previous shard"),
    (lambda d: d.update(shards=d["shards"] + d["shards"][:1], rows=4000), "ids start at 0"),
    (lambda d: d["shards"][1].update(files=d["shards"][1]["files"] * 2), "listed twice"),
    (lambda d: d["metadata"].update(score="int64"), "column 'score' is double"),
    (lambda d: d["shards"][0]["files"][0]["columns"].remove("score"), "lacks columns"),
    (lambda d: d.update(rows=2999), "rows = 2999 but the shards hold 3000"),
])
def test_wrong_numbers_are_caught_at_open(lake3: Path, change, match) -> None:  # type: ignore[no-untyped-def]
    edit_manifest(lake3, change)
    with pytest.raises(CorruptShardError, match=match):
        open_lake(lake3)


def test_id_range_edit_caught_by_the_footer_cross_check(lake3: Path) -> None:
    # consistent with the other shards (ranges still ascend), only the file knows the truth
    edit_manifest(lake3, lambda d: (d["shards"][2].update(id_max=3000), d.update(next_id=3001)))
    with pytest.raises(CorruptShardError, match=r"holds ids 2000\.\.2999, the manifest says 2000\.\.3000"):
        open_lake(lake3)


def test_verify_checks_ids_ascend_inside_every_file(lake3: Path) -> None:
    with open_lake(lake3) as lake:
        assert lake.verify() == []
        # the only way ids inside a file go wrong: a rewritten file whose size/CRC were recorded too
        import pyarrow as pa

        f = lake.manifest.shards[0].files[0]
        src = lake3 / f.path
        batch = pa.ipc.open_file(pa.OSFile(str(src))).get_batch(0)   # a copy in memory, not a map
        ids = batch.column("id").to_numpy().copy()
        ids[[10, 11]] = ids[[11, 10]]
        cols = {n: batch.column(n) for n in batch.schema.names}
        cols["id"] = pa.array(ids)
        bad = pa.RecordBatch.from_pydict(cols)
    tmp = src.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as out, pa.ipc.new_file(out, bad.schema) as w:
        w.write_batch(bad)
    tmp.replace(src)
    import zlib

    data = src.read_bytes()
    def record(doc: dict) -> None:  # type: ignore[type-arg]
        entry = doc["shards"][0]["files"][0]
        entry.update(bytes=len(data), crc32=zlib.crc32(data))
        entry.pop("block_bytes", None)      # a file without block checksums: the whole-file CRC32 rules
        entry.pop("block_crc32c", None)

    edit_manifest(lake3, record)
    with open_lake(lake3) as lake:   # the footer check at open sees the right first/last id
        problems = lake.verify()
    assert len(problems) == 1 and "ids do not strictly ascend at row 11" in problems[0]


def corrupt_newest(lake: Path, how: str) -> Path:
    path = manifest_path(lake)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage\xff" * 7)
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_newest_manifest_is_named_and_older_versions_stay_reachable(lake3: Path, how: str) -> None:
    want = reference(lake3, version=2)
    bad = corrupt_newest(lake3, how)
    with pytest.raises(CorruptShardError) as exc:
        open_lake(lake3)
    assert str(bad) in str(exc.value) and "version=2" in str(exc.value) and "m2m rollback" in str(exc.value)
    with open_lake(lake3, version=2) as lake:           # observed: every older version was unopenable
        got = lake.splats()
        np.testing.assert_array_equal(got["mu"], want["mu"])
        assert lake.verify() == []
    r = cli("verify", "-q", "--version", "2", str(lake3))
    assert r.returncode == 0 and "2,000 rows, version 2" in r.stdout
    r = cli("verify", "-q", str(lake3))
    assert r.returncode == 1 and str(bad) in r.stderr


def test_rollback_commits_a_copy_and_deletes_nothing(lake3: Path) -> None:
    want = reference(lake3, version=2)
    bad = corrupt_newest(lake3, "truncated")
    r = cli("rollback", str(lake3), "--to", "2")
    assert r.returncode == 0, r.stderr
    assert "version 4 = version 2 (2,000 rows)" in r.stdout
    assert bad.exists()                              # never deletes
    with open_lake(lake3) as lake:
        assert lake.version == 4 and lake.manifest.operation == {"type": "rollback", "to": 2, "from": 3}
        np.testing.assert_array_equal(lake.splats()["mu"], want["mu"])
        assert lake.verify() == []
        ids = lake.add_splats(np.ones((2, D)), labels=[1, 2], metadata={"score": [0.5, 0.5]})
        # the corrupt v3 states nothing, but its append's shard file is stamped next_id 3000 (v2's next_id, 2000,
        # handed v3's ids out again until 2026-12-08)
        assert ids.tolist() == [3000, 3001]


def test_rollback_never_reuses_ids_of_abandoned_versions(lake3: Path) -> None:
    m = rollback(lake3, 1)
    assert (m.version, m.rows, m.next_id) == (4, 1000, 3000)
    with open_lake(lake3) as lake:
        ids = lake.add_splats(np.ones((1, D)), labels=[0], metadata={"score": [1.0]})
    assert ids.tolist() == [3000]


def test_rollback_refuses_an_unreadable_target(lake3: Path) -> None:
    corrupt_newest(lake3, "garbage")
    with pytest.raises(CorruptShardError, match="v0000000003.json"):
        rollback(lake3, 3)
    r = cli("rollback", str(lake3), "--to", "7")
    assert r.returncode == 1 and "no version 7" in r.stderr


def test_repair_moves_the_unreadable_head_aside(lake3: Path) -> None:
    want = reference(lake3, version=2)
    bad = corrupt_newest(lake3, "garbage")
    content = bad.read_bytes()
    r = cli("repair", "--dry-run", str(lake3))
    assert r.returncode == 0 and "would move unreadable version 3" in r.stdout and bad.exists()
    r = cli("repair", str(lake3))
    assert r.returncode == 0 and "moved unreadable version 3 aside" in r.stdout
    assert "head is version 4, a copy of version 2" in r.stdout
    aside = list((lake3 / "_manifests").glob("v0000000003.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content and not bad.exists()
    with open_lake(lake3) as lake:
        assert lake.version == 4 and lake.manifest.parent == 2
        assert lake.manifest.operation == {"type": "repair", "restored": 2, "moved": [3], "id_floor": 3000}
        np.testing.assert_array_equal(lake.splats()["mu"], want["mu"])
        lake.add_splats(np.ones((1, D)), labels=[0], metadata={"score": [1.0]})
        assert lake.version == 5
    assert cli("repair", str(lake3)).stdout.startswith("ok: every manifest is readable")
    with pytest.raises(LakeNotFoundError, match="no version 3"):
        open_lake(lake3, version=3)


def test_repair_never_hands_out_a_version_number_it_moved_aside(lake3: Path) -> None:
    """observed: the next commit after a repair wrote version 3 again, so a reader or a stream state pinned to
    the version 3 it had read found other rows under the same number (the same row count passes a state's check)"""
    with open_lake(lake3) as lake:
        seen = lake.manifest.to_json()
        assert lake.version == 3
    corrupt_newest(lake3, "truncated")
    r = repair(lake3)
    assert (r["head"], r["restored"]) == (4, 2)
    with open_lake(lake3) as lake:
        lake.add_splats(np.ones((1, D)), labels=[0], metadata={"score": [1.0]})
        assert lake.version == 5
    assert sorted(int(p.name[1:11]) for p in (lake3 / "_manifests").glob("v*.json")) == [0, 1, 2, 4, 5]
    assert seen not in [p.read_bytes() for p in (lake3 / "_manifests").glob("v*.json")]


def test_rollback_keeps_the_ids_an_unreadable_newer_version_states(lake3: Path) -> None:
    """observed: rollback skipped a newer version it could not read, so the next append handed out the ids
    that version's (intact) JSON states and that a reader may have seen; repair kept them"""
    path = manifest_path(lake3)
    doc = json.loads(path.read_text())
    assert doc["next_id"] == 3000
    doc["shards"][-1]["rows"] += 1                  # still JSON with its next_id, fails its checksum
    path.write_text(json.dumps(doc))
    m = rollback(lake3, 1)
    assert (m.version, m.rows, m.next_id) == (4, 1000, 3000)
    with open_lake(lake3) as lake:
        assert lake.add_splats(np.ones((1, D)), labels=[0], metadata={"score": [1.0]}).tolist() == [3000]


def test_repair_reports_older_unreadable_versions_and_never_empties_a_lake(lake3: Path) -> None:
    manifest_path(lake3, 1).write_text("{}")
    r = repair(lake3)
    assert r["moved"] == [] and [v for v, _ in r["unreadable"]] == [1] and r["head"] == 3
    for v in (0, 2, 3):
        manifest_path(lake3, v).write_text("[")
    with pytest.raises(CorruptShardError, match="no version .* is readable; nothing was moved"):
        repair(lake3)
    assert len(list((lake3 / "_manifests").glob("v*.json"))) == 4


def test_v1_and_block_fields_round_trip(lake3: Path) -> None:
    m = Manifest.from_json(manifest_path(lake3).read_bytes(), "x")
    f = m.shards[0].files[0]
    import dataclasses

    f2 = dataclasses.replace(f, block_bytes=-(-f.bytes // 3), block_crc32c=(1, 2, 3))
    m2 = dataclasses.replace(m, shards=(dataclasses.replace(m.shards[0], files=(f2,)),) + m.shards[1:])
    data = m2.to_json()
    back = Manifest.from_json(data, "y")
    assert back.shards[0].files[0] == f2
    doc = json.loads(data)
    assert doc["shards"][0]["files"][0]["block_crc32c"] == [1, 2, 3]
    plain = dataclasses.replace(f, block_bytes=None, block_crc32c=None).to_doc()
    assert "block_bytes" not in plain and "block_crc32c" not in plain   # absent when not set
    doc["shards"][0]["files"][0]["block_crc32c"] = [1, 2, 4]      # covered by the checksum
    with pytest.raises(CorruptShardError, match="checksum mismatch"):
        Manifest.from_json(json.dumps(doc).encode(), "z")
    doc["checksum"] = manifest_checksum(doc)
    assert Manifest.from_json(json.dumps(doc).encode(), "z").shards[0].files[0].block_crc32c == (1, 2, 4)
    doc["shards"][0]["files"][0]["block_crc32c"] = [1, 2, 1 << 32]
    doc["checksum"] = manifest_checksum(doc)
    with pytest.raises(CorruptShardError, match="not a list of uint32"):
        Manifest.from_json(json.dumps(doc).encode(), "z")
    doc["shards"][0]["files"][0]["block_crc32c"] = [1, 2]
    doc["checksum"] = manifest_checksum(doc)
    with pytest.raises(CorruptShardError, match="2 block checksums .* do not cover"):
        Manifest.from_json(json.dumps(doc).encode(), "z")


@pytest.mark.parametrize("doc", [b"", b"null", b"[]", b'{"format": "m2m-lake", "format_version": 3}',
                                 b'{"format": "m2m-lake", "format_version": true}', b"\xff\xfe",
                                 b'{"format": "m2m-lake", "format_version": 1}', b"[" * 100000])
def test_unreadable_manifest_bytes_are_corrupt_shard_errors(doc: bytes) -> None:
    with pytest.raises(M2MError, match="manifest where"):
        Manifest.from_json(doc, "where")


def test_remote_lake_cross_checks_each_file_at_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    import fsspec

    monkeypatch.setenv("M2M_CACHE_DIR", str(tmp_path / "cache"))
    url = f"memory://m2m-int-{uuid.uuid4().hex}/lake"
    try:
        with create_m2m(M2MConfig(path=url, latent_dim=D)) as lake:
            for _ in range(2):
                lake.add_splats(np.random.default_rng(0).standard_normal((30, D)))
        fs, root = fsspec.core.url_to_fs(url)
        newest = sorted(p for p in fs.ls(f"{root}/_manifests", detail=False) if p.endswith(".json"))[-1]
        doc = json.loads(fs.cat_file(newest))
        doc["shards"][1]["rows"] = 29                         # checksum recomputed: only the files can tell
        doc["rows"] = 59
        doc["checksum"] = manifest_checksum(doc)
        fs.pipe_file(newest, json.dumps(doc).encode())
        with open_lake(url) as lake:                          # opening fetches no shard file
            assert len(lake) == 59
            lake.snapshot.column(0, "mu")                     # shard 0 is fine
            with pytest.raises(CorruptShardError, match="has 30 rows, the manifest says 29"):
                lake.splats()
            assert any("has 30 rows, the manifest says 29" in p for p in lake.verify())
    finally:
        fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)
