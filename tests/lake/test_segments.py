"""Format 3: a version file over immutable segment files (issue 21). ``SEGMENT_SHARDS`` is set to 2
here so that a few appends make a segmented lake; the layout is the same at 256."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import m2m.lake.manifest as mf
from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import CommitConflictError, CorruptShardError, SignatureError
from m2m.lake.manifest import manifest_checksum
from m2m.lake.recovery import repair, rollback

KEY = "segment-test-key"


@pytest.fixture(autouse=True)
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mf, "SEGMENT_SHARDS", 2)


def _rows(n: int, seed: int, d: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _make(path: Path, appends: int = 7, rows: int = 10, **config: Any) -> np.ndarray:
    xs = [_rows(rows, i) for i in range(appends)]
    with create_m2m(M2MConfig(path=str(path), latent_dim=8, **config)) as lake:
        for x in xs:
            lake.add_splats(x)
    x = np.concatenate(xs)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _head(path: Path) -> tuple[Path, dict[str, Any]]:
    p = sorted((path / "_manifests").glob("v*.json"))[-1]
    return p, json.loads(p.read_text())


def _save(p: Path, doc: dict[str, Any], key: str | None = None) -> None:
    doc.pop("signature", None)
    doc["checksum"] = manifest_checksum(doc)
    if key is not None:
        doc["signature"] = mf.manifest_signature(doc, key.encode())
    p.write_text(json.dumps(doc, indent=1, sort_keys=True))


def _rewrite_segment(path: Path, doc: dict[str, Any], i: int, change: Callable[[dict[str, Any]], None],
                     rehash: bool = True) -> None:
    """Edit segment ``i`` of the version ``doc``; ``rehash``: fix its reference (sha256, bytes, rows,
    ids, count) as a forger would."""
    ref = doc["segments"][i]
    seg_path = path / ref["path"]
    seg = json.loads(seg_path.read_text())
    change(seg)
    data = json.dumps(seg, sort_keys=True, separators=(",", ":")).encode()
    seg_path.chmod(0o644)
    seg_path.write_bytes(data)
    if rehash:
        sh = seg["shards"]
        ref.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), shards=len(sh),
                   rows=sum(s["rows"] for s in sh), id_min=sh[0]["id_min"], id_max=sh[-1]["id_max"])
        doc["rows"] = sum(r["rows"] for r in doc["segments"])


def _refused(path: Path, **kw: Any) -> str:
    """The error a reader gets: at open, or at the latest when it reads every row."""
    with pytest.raises((CorruptShardError, SignatureError)) as exc:
        with open_lake(str(path), **kw) as lake:
            lake.splats()
    return str(exc.value)


def test_round_trip_segments_and_reuse(tmp_path: Path) -> None:
    want = _make(tmp_path / "l")
    p, doc = _head(tmp_path / "l")
    assert doc["format_version"] == 3 and "shards" not in doc
    assert [r["shards"] for r in doc["segments"]] == [2, 2, 2, 1]
    with open_lake(str(tmp_path / "l")) as lake:
        assert lake.manifest.format_version == 3 and len(lake) == 70
        np.testing.assert_allclose(lake.splats()["mu"], want, atol=1e-6)
        assert lake.verify() == []
        segs_before = [g.path for g in lake.manifest.segments or ()]
        lake.add_splats(_rows(10, 99))
        segs_after = [g.path for g in lake.manifest.segments or ()]
        # an append rewrites only the last, non-full segment: the full ones are reused as they are
        assert segs_after[:3] == segs_before[:3] and segs_after[3] != segs_before[3]
        lake.add_splats(_rows(10, 98))
        assert [g.path for g in lake.manifest.segments or ()][:4] == segs_after  # a full one, then a new one
        assert len(lake) == 90
    # older versions stay readable, format 2 ones (<= 2 shards) included
    with open_lake(str(tmp_path / "l"), version=2) as old:
        assert old.manifest.format_version == 2 and len(old) == 20
    with open_lake(str(tmp_path / "l"), version=5) as old:
        assert old.manifest.format_version == 3 and len(old) == 50
        np.testing.assert_allclose(old.splats()["mu"], want[:50], atol=1e-6)


def test_format_2_lake_is_upgraded_on_its_next_commit_and_never_downgraded(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mf, "SEGMENT_SHARDS", 256)
    want = _make(tmp_path / "l", appends=3)
    assert _head(tmp_path / "l")[1]["format_version"] == 2
    monkeypatch.setattr(mf, "SEGMENT_SHARDS", 2)
    with open_lake(str(tmp_path / "l")) as lake:
        assert lake.manifest.format_version == 2
        lake.add_splats(_rows(10, 3))
        assert lake.manifest.format_version == 3
        lake.compact()  # down to one shard: still format 3 (a format-2 version after it would be refused)
        assert len(lake.manifest.shards) == 1 and lake.manifest.format_version == 3
        np.testing.assert_allclose(lake.splats()["mu"][:30], want, atol=1e-6)
    assert _head(tmp_path / "l")[1]["format_version"] == 3
    # a format-2 (inline) version file written after a format-3 one: refused as a downgrade
    p, doc = _head(tmp_path / "l")
    with open_lake(str(tmp_path / "l")) as lake:
        inline = json.loads(lake.manifest.to_json())
    inline.update(version=doc["version"] + 1, parent=doc["version"])
    _save(p.with_name(f"v{doc['version'] + 1:010d}.json"), inline)
    assert "downgrade" in _refused(tmp_path / "l")


@pytest.mark.parametrize("case", ["edited-rehashed", "edited", "swapped", "other-lake", "dropped-middle",
                                  "dropped-last", "path", "repeated"])
def test_forged_segments_are_refused(tmp_path: Path, case: str) -> None:
    _make(tmp_path / "l")
    p, doc = _head(tmp_path / "l")
    if case == "edited-rehashed":  # one row fewer, every hash and total recomputed: the files tell
        _rewrite_segment(tmp_path / "l", doc, 1, lambda s: s["shards"][0].update(rows=9))
    elif case == "edited":
        _rewrite_segment(tmp_path / "l", doc, 1, lambda s: s["shards"][0].update(rows=9), rehash=False)
    elif case == "swapped":
        doc["segments"][0], doc["segments"][1] = doc["segments"][1], doc["segments"][0]
    elif case == "other-lake":
        _make(tmp_path / "o")
        _, other = _head(tmp_path / "o")
        ref = other["segments"][1]
        shutil.copy(tmp_path / "o" / ref["path"], tmp_path / "l" / ref["path"])
        doc["segments"][1] = ref
    elif case == "dropped-middle":
        del doc["segments"][1]
        doc["rows"] = sum(r["rows"] for r in doc["segments"])
    elif case == "dropped-last":
        del doc["segments"][-1]
        doc["rows"] = sum(r["rows"] for r in doc["segments"])
    elif case == "path":
        doc["segments"][0]["path"] = "_segments/../_manifests/v0000000001.json"
    elif case == "repeated":
        doc["segments"].insert(1, doc["segments"][0])
        doc["rows"] = sum(r["rows"] for r in doc["segments"])
    _save(p, doc)
    msg = _refused(tmp_path / "l")
    assert {"edited-rehashed": "rows", "edited": "sha256", "swapped": "not after", "other-lake": "belongs to lake",
            "dropped-middle": "was written after id", "dropped-last": "next_id", "path": "segment path",
            "repeated": "listed twice"}[case] in msg, msg


def test_signed_lake_refuses_a_rehashed_segment_at_open(tmp_path: Path) -> None:
    _make(tmp_path / "l", lake_key=KEY)
    p, doc = _head(tmp_path / "l")
    _rewrite_segment(tmp_path / "l", doc, 0, lambda s: s["shards"][0].update(rows=9))
    _save(p, doc)  # checksum recomputed, signature not (no key)
    with pytest.raises(SignatureError):
        open_lake(str(tmp_path / "l"), lake_key=KEY)
    _save(p, doc, key="another key")
    with pytest.raises(SignatureError):
        open_lake(str(tmp_path / "l"), lake_key=KEY)


def test_vacuum_keeps_every_segment_a_kept_version_references(tmp_path: Path) -> None:
    _make(tmp_path / "l")
    seg_dir = tmp_path / "l" / "_segments"
    orphan = seg_dir / f"{'a' * 32}.json"  # a commit that died between its segment and its version file
    orphan.write_text("{}")
    (seg_dir / "notes.txt").write_text("mine")
    with open_lake(str(tmp_path / "l")) as lake:
        want = lake.splats()["mu"]
        keep2 = {g.path.split("/")[1] for v in lake.versions()[-2:]
                 for g in (lake.checkout(v).manifest.segments or ())}
        lake.vacuum(keep=2)
        assert {p.name for p in seg_dir.glob("*.json")} == keep2
        assert (seg_dir / "notes.txt").exists() and not orphan.exists()
        with open_lake(str(tmp_path / "l"), version=lake.versions()[0]) as old:
            assert len(old) == 60
        lake.vacuum(keep=1)
        assert {p.name for p in seg_dir.glob("*.json")} == {g.path.split("/")[1] for g in lake.manifest.segments or ()}
    with open_lake(str(tmp_path / "l")) as lake:
        np.testing.assert_array_equal(lake.splats()["mu"], want)
        assert lake.verify() == []


def test_vacuum_refuses_a_symlinked_segments_folder_before_deleting_anything(tmp_path: Path) -> None:
    # it was refused only after the old versions and their data files were deleted (a probing user, 2026-12-08)
    from m2m.errors import ConfigError

    _make(tmp_path / "l")
    with open_lake(str(tmp_path / "l")) as lake:
        lake.compact()
    outside = tmp_path / "segments-elsewhere"
    (tmp_path / "l" / "_segments").rename(outside)
    (tmp_path / "l" / "_segments").symlink_to(outside)
    before = {d: sorted(os.listdir(tmp_path / "l" / d)) for d in ("_manifests", "_data")}
    with open_lake(str(tmp_path / "l")) as lake, pytest.raises(ConfigError, match="_segments is a symlink"):
        lake.vacuum(keep=1)
    assert {d: sorted(os.listdir(tmp_path / "l" / d)) for d in ("_manifests", "_data")} == before
    with open_lake(str(tmp_path / "l")) as lake:
        assert lake.vacuum(keep=1, allow_symlinked_dirs=True)["versions_removed"] > 0


def test_crash_between_segment_and_version_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make(tmp_path / "l")
    seg_dir = tmp_path / "l" / "_segments"
    before = sorted(p.name for p in seg_dir.iterdir())
    with open_lake(str(tmp_path / "l")) as lake:
        head = lake.version

        def die(rel: str, data: bytes) -> bool:
            raise KeyboardInterrupt  # the process stops after writing its segment, before its version file

        real = type(lake._fs).create_exclusive
        type(lake._fs).create_exclusive = lambda self, rel, data: die(rel, data)  # type: ignore[method-assign]
        try:
            with pytest.raises(KeyboardInterrupt):
                lake.add_splats(_rows(10, 50))
        finally:
            type(lake._fs).create_exclusive = real  # type: ignore[method-assign]
        # the commit removed what it wrote; readers never saw it
        assert sorted(p.name for p in seg_dir.iterdir()) == before
        assert lake.refresh() == head and len(lake) == 70
        lake.add_splats(_rows(10, 51))
        assert len(lake) == 80 and lake.verify() == []


def test_rollback_and_repair_of_a_segmented_lake(tmp_path: Path) -> None:
    want = _make(tmp_path / "l")
    new = rollback(str(tmp_path / "l"), to=4)
    assert new.format_version == 3 and new.rows == 40 and new.version == 8
    with open_lake(str(tmp_path / "l")) as lake:
        np.testing.assert_allclose(lake.splats()["mu"], want[:40], atol=1e-6)
        assert lake.add_splats(_rows(10, 7))[0] == 70  # ids of the abandoned versions are not reused
    # a version whose segment is gone: repair moves it aside, the previous head is read again
    p, doc = _head(tmp_path / "l")
    (tmp_path / "l" / doc["segments"][-1]["path"]).unlink()
    with pytest.raises(CorruptShardError, match="is missing.*m2m repair"):
        open_lake(str(tmp_path / "l"))
    report = repair(str(tmp_path / "l"))
    # the version moved aside (its file intact, a segment gone) had handed out ids 70..79: the repair
    # commits a copy of the readable head above it that never hands them out again (the next append reused
    # them), nor its version number
    assert report["head"] == doc["version"] + 1 and report["id_floor"] == doc["next_id"] == 80
    with open_lake(str(tmp_path / "l")) as lake:
        assert len(lake) == 40 and lake.manifest.operation["type"] == "repair"
        assert lake.add_splats(_rows(3, 8))[0] == 80


def test_compaction_writes_new_segments(tmp_path: Path) -> None:
    want = _make(tmp_path / "l")
    with open_lake(str(tmp_path / "l")) as lake:
        old = {g.path for g in lake.manifest.segments or ()}
        lake.compact()
        assert len(lake.manifest.shards) == 1 and lake.manifest.format_version == 3
        assert {g.path for g in lake.manifest.segments or ()}.isdisjoint(old)
    with open_lake(str(tmp_path / "l")) as lake:
        np.testing.assert_allclose(lake.splats()["mu"], want, atol=1e-6)
        assert lake.verify() == []


def test_commit_conflict_leaves_no_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make(tmp_path / "l")
    seg_dir = tmp_path / "l" / "_segments"
    before = sorted(os.listdir(seg_dir))
    with open_lake(str(tmp_path / "l")) as lake:
        monkeypatch.setattr(type(lake._fs), "create_exclusive", lambda self, rel, data: False)
        with pytest.raises(CommitConflictError):
            lake.add_splats(_rows(10, 60))
    assert sorted(os.listdir(seg_dir)) == before


# ---------------------------------------------------------------- lazy segments (issue 21: open in O(version file))
def _count_segment_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every segment file read from a local lake from now on (by path)."""
    from m2m.lake.fs import LocalFS

    reads: list[str] = []
    real = LocalFS.read_bytes

    def counted(self: LocalFS, rel: str) -> bytes:
        if rel.startswith(mf.SEGMENT_DIR + "/"):
            reads.append(rel)
        return real(self, rel)

    monkeypatch.setattr(LocalFS, "read_bytes", counted)
    return reads


def test_open_reads_only_the_last_segment_and_an_append_no_other(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    want = _make(tmp_path / "l", appends=9)  # 5 segments
    _, doc = _head(tmp_path / "l")
    assert len(doc["segments"]) == 5 and all("geometry_rows" in r for r in doc["segments"])
    reads = _count_segment_reads(monkeypatch)
    with open_lake(str(tmp_path / "l")) as lake:
        # rows, next_id, schema and the tail need no other segment
        assert reads == [doc["segments"][-1]["path"]]
        assert len(lake) == 90 and lake.manifest.next_id == 90 and len(lake.manifest.shards) == 9
        assert lake.manifest.shards[-1].id_max == 89 and reads == [doc["segments"][-1]["path"]]
        lake.add_splats(_rows(10, 90))  # rewrites the last segment only: reads nothing more
        assert reads == [doc["segments"][-1]["path"]]
        assert [g.path for g in lake.manifest.segments or ()][:4] == [r["path"] for r in doc["segments"][:4]]
        # a read of one shard loads its segment only; reading every row loads the rest, once each
        assert lake.manifest.shards[2].id_min == 20 and reads[1:] == [doc["segments"][1]["path"]]
        np.testing.assert_allclose(lake.splats()["mu"][:90], want, atol=1e-6)
        assert sorted(reads) == sorted(r["path"] for r in doc["segments"])
        assert lake.verify() == []


def test_a_damaged_segment_is_refused_at_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make(tmp_path / "l")
    p, doc = _head(tmp_path / "l")
    seg = tmp_path / "l" / doc["segments"][1]["path"]
    seg.chmod(0o644)
    seg.write_bytes(seg.read_bytes().replace(b'"rows":10', b'"rows":11', 1))  # not rehashed
    with open_lake(str(tmp_path / "l")) as lake:  # the version file and the last segment are sound
        assert len(lake) == 70
        for use in (lambda: lake.manifest.shards[2], lambda: lake.splats(), lambda: list(lake.manifest.shards),
                    lambda: lake.manifest.shards[1:3]):
            with pytest.raises(CorruptShardError, match=r"v0000000007\.json is corrupt: segment .* sha256"):
                use()  # and again: a refusal is not forgotten
        assert lake.manifest.shards[0].rows == 10  # the other segments stay readable
        problems = lake.verify()  # verify reads every segment
        assert len(problems) == 1 and doc["segments"][1]["path"] in problems[0]
    report = repair(str(tmp_path / "l"))  # repair reads every segment: versions 4-7 reference the damaged one
    assert [v for v, _, _ in report["moved"]] == [4, 5, 6, 7]
    # a copy of version 3 above the moved ones (no number handed out again), ids 40..69 never handed out again
    assert (report["head"], report["restored"], report["id_floor"]) == (8, 3, 70)


def test_verify_reads_every_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make(tmp_path / "l")
    _, doc = _head(tmp_path / "l")
    reads = _count_segment_reads(monkeypatch)
    with open_lake(str(tmp_path / "l")) as lake:
        assert lake.verify() == []
    assert sorted(reads) == sorted(r["path"] for r in doc["segments"])


def test_geometry_totals_without_and_with_geometry_rows(tmp_path: Path) -> None:
    _make(tmp_path / "l")
    p, doc = _head(tmp_path / "l")
    doc["geometry"] = {"k": 4, "rows": 10}  # no shard has a sidecar: a forged total
    _save(p, doc)
    with pytest.raises(CorruptShardError, match="geometry covers 10 rows"):
        open_lake(str(tmp_path / "l"))  # the references say 0 rows with sidecars: refused at open
    # a version file written before references had geometry_rows: checked once every segment is loaded
    for r in doc["segments"]:
        del r["geometry_rows"]
    _save(p, doc)
    with open_lake(str(tmp_path / "l")) as lake:
        with pytest.raises(CorruptShardError, match="geometry covers 10 rows"):
            lake.splats()
        assert "geometry covers 10 rows" in lake.verify()[0]
    # a reference's geometry_rows that its segment contradicts
    doc["geometry"] = None
    doc["segments"][0]["geometry_rows"] = 5
    _save(p, doc)
    with open_lake(str(tmp_path / "l")) as lake:
        with pytest.raises(CorruptShardError, match="0 rows with geometry sidecars; its reference says 5"):
            lake.splats()


def test_an_old_version_file_gets_geometry_rows_on_the_next_commit(tmp_path: Path) -> None:
    _make(tmp_path / "l")
    p, doc = _head(tmp_path / "l")
    for r in doc["segments"]:
        del r["geometry_rows"]
    _save(p, doc)
    with open_lake(str(tmp_path / "l")) as lake:
        lake.add_splats(_rows(10, 70))
    _, new = _head(tmp_path / "l")
    assert [r["geometry_rows"] for r in new["segments"]] == [0] * 4
    assert [r["path"] for r in new["segments"][:3]] == [r["path"] for r in doc["segments"][:3]]
    with open_lake(str(tmp_path / "l")) as lake:
        assert len(lake) == 80 and lake.verify() == []


def test_segments_first_used_from_many_threads_are_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    _make(tmp_path / "l", appends=9)
    reads = _count_segment_reads(monkeypatch)
    with open_lake(str(tmp_path / "l")) as lake:
        shards = lake.manifest.shards
        got: list[list[int]] = []
        barrier = threading.Barrier(8)

        def use() -> None:
            barrier.wait()
            got.append([shards[i].id_min for i in range(len(shards))])

        threads = [threading.Thread(target=use) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [list(range(0, 90, 10))] * 8
        assert len(reads) == len(set(reads)) == 5


def test_a_pickled_snapshot_of_a_segmented_lake_reads(tmp_path: Path) -> None:
    import pickle

    want = _make(tmp_path / "l")
    with open_lake(str(tmp_path / "l")) as lake:
        snap = pickle.loads(pickle.dumps(lake.snapshot))  # as a stream's workers get it: nothing loaded yet
        np.testing.assert_allclose(snap.read_main("mu").astype(np.float32), want, atol=1e-3)
        assert snap.manifest.shards == lake.manifest.shards


def test_a_reader_of_a_vacuumed_segmented_version_is_told_to_reopen(tmp_path: Path) -> None:
    # observed: a format-3 reader pinned to a vacuumed version was told its manifest "is corrupt" (pointing at
    # repair), where a format-2 reader is told to reopen the lake
    _make(tmp_path / "l")
    with open_lake(str(tmp_path / "l")) as pinned, open_lake(str(tmp_path / "l")) as writer:
        writer.add_splats(_rows(10, 9))
        writer.compact()
        writer.vacuum(keep=1)
        with pytest.raises(CorruptShardError, match="reopen the lake") as exc:
            pinned.splats()
        assert "\n" not in str(exc.value)


def _swap_files(seg: dict[str, Any], which: int) -> None:
    """Swap file ``which`` (0: the main file, 1: the kappa sidecar) of a segment's two shards."""
    a, b = seg["shards"][0]["files"], seg["shards"][1]["files"]
    a[which], b[which] = b[which], a[which]


@pytest.mark.parametrize("which", [0, 1])
def test_files_swapped_in_a_rehashed_segment_never_give_other_rows(tmp_path: Path, which: int) -> None:
    """Reads by extent (random access, the stream) and exports skipped the footer check of a format-3
    lake's files: lake[3] returned another row, the stream paired embeddings with other ids and
    to_arrow wrote other rows' labels, silently (observed by a probing user; remote lakes alike)."""
    path = tmp_path / "l"
    x = _make(path, appends=4, rows=10)
    with open_lake(str(path)) as lake:
        lake.add_splats(_rows(10, 50))
        if which:
            lake.estimate_kappa()
    p, doc = _head(path)
    _rewrite_segment(path, doc, 0, lambda seg: _swap_files(seg, which))
    _save(p, doc)
    reads: dict[str, Callable[[Any], object]] = {
        "getitem": lambda lk: lk[3], "take": lambda lk: lk.take([3]), "slice": lambda lk: lk[0:20],
        "to_arrow": lambda lk: lk.to_arrow(), "stream": lambda lk: [
            b for b in lk.export_to_dataloader(batch_size=5, shuffle=False, columns=("embedding", "id"))]}
    for name, read in reads.items():
        with open_lake(str(path)) as lake:  # a fresh handle each: nothing checked by another read before
            with pytest.raises(CorruptShardError, match=r"shard file .* holds ids"):
                read(lake)
    assert x.shape == (40, 8)
