"""Issue 18 items 1, 3, 6, 7: edits with the manifest hash recomputed (as an attacker would) are errors,
never silent wrong data; signed lakes; vacuum deletes only its own files; manifest listing.

Numbers of the issue: shards of 300 rows, string labels, kappa estimated, then one more append.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import ConfigError, CorruptShardError, SignatureError, UnknownColumnError
from m2m.lake.manifest import check_file_path
from m2m.lake.recovery import repair
from tests.lake.manifest_edit import edit_manifest, manifest_path

D = 8
NAMES = np.array(["ant", "bee", "cow", "dog"])


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m2m.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def build(path: Path, seed: int = 0, estimate_twice: bool = False) -> Path:
    g = np.random.default_rng(seed)
    with create_m2m(M2MConfig(path=path, latent_dim=D, knn_k=4)) as lake:
        for _ in range(3):
            lake.add_splats(g.standard_normal((300, D)), labels=NAMES[g.integers(0, 4, 300)])
        lake.estimate_kappa(threads=1)
        if estimate_twice:
            lake.add_splats(g.standard_normal((300, D)), labels=NAMES[g.integers(0, 4, 300)])
            lake.estimate_kappa(threads=1)
        lake.add_splats(g.standard_normal((300, D)), labels=NAMES[g.integers(0, 4, 300)])
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("pristine") / "lake")


@pytest.fixture
def lake(pristine: Path, tmp_path: Path) -> Path:
    path = tmp_path / "lake"
    shutil.copytree(pristine, path)
    return path


def refused(path: Path, match: str) -> None:
    """Opening (and then reading everything) raises CorruptShardError matching ``match``."""
    with pytest.raises(CorruptShardError, match=match):
        with open_lake(path) as lk:
            lk.splats()
            for i, shard in enumerate(lk.manifest.shards):
                if any("neighbors" in f.columns for f in shard.files):
                    lk.snapshot.column(i, "neighbors")


def test_pristine_lake_verifies(lake: Path) -> None:
    with open_lake(lake) as lk:
        assert lk.verify() == []
        assert lk.manifest.lake_id is not None


def test_reversed_label_vocabulary_is_refused(lake: Path) -> None:
    # observed: streamed label codes changed, splats() strings did not, verify() == []
    edit_manifest(lake, lambda d: d["label_vocabulary"].reverse())
    refused(lake, "another label vocabulary")


def test_stale_sidecar_from_an_older_version_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path / "lake", estimate_twice=True)
    versions = sorted(manifest_path(path).parent.glob("v*.json"))
    first_estimate = next(json.loads(p.read_text()) for p in versions
                          if json.loads(p.read_text())["operation"]["type"] == "estimate_kappa")
    stale = first_estimate["shards"][0]["files"][-1]
    edit_manifest(path, lambda d: d["shards"][0]["files"].__setitem__(-1, stale))
    refused(path, "stale sidecar")


def test_two_sidecars_column_lists_edited_and_swapped_are_refused(lake: Path) -> None:
    # kappa/neighbours would land on the wrong rows: the sidecar's ids bind it to its shard
    def swap(d: dict[str, Any]) -> None:
        a, b = d["shards"][0]["files"], d["shards"][1]["files"]
        for f in (a[-1], b[-1]):
            f["columns"] = [c for c in f["columns"] if c != "id"]
        a[-1], b[-1] = b[-1], a[-1]
    edit_manifest(lake, swap)
    refused(lake, "holds columns|holds ids")


def test_sidecar_swapped_with_id_columns_kept_is_refused(lake: Path) -> None:
    def swap(d: dict[str, Any]) -> None:
        a, b = d["shards"][0]["files"], d["shards"][1]["files"]
        a[-1], b[-1] = b[-1], a[-1]
    edit_manifest(lake, swap)
    refused(lake, "holds ids 300..599, the manifest says 0..299")


@pytest.mark.parametrize("which", [0, 1, -1])
def test_shard_dropped_with_rows_fixed_is_refused(lake: Path, which: int) -> None:
    # observed: 300 rows gone, verify() == []
    def drop(d: dict[str, Any]) -> None:
        gone = d["shards"].pop(which)
        d["rows"] -= gone["rows"]
        if d["geometry"] and any("neighbors" in f["columns"] for f in gone["files"]):
            d["geometry"]["rows"] -= gone["rows"]
    edit_manifest(lake, drop)
    refused(lake, "a shard dropped")


def test_shard_copied_from_another_lake_is_refused(lake: Path, tmp_path: Path) -> None:
    # observed: an entry pointing at another lake's shard with the same ids: 300/300 rows differ
    other = build(tmp_path / "other", seed=1)
    theirs = json.loads(manifest_path(other).read_text())["shards"][1]["files"][0]
    shutil.copy(other / theirs["path"], lake / theirs["path"])
    edit_manifest(lake, lambda d: d["shards"][1]["files"].__setitem__(0, theirs))
    refused(lake, "belongs to another lake")


def _compacted(path: Path, seed: int) -> Path:
    """6 appends of 3,000 rows (string labels, kappa estimated), compacted two by two into 3 shards."""
    g = np.random.default_rng(seed)
    with create_m2m(M2MConfig(path=path, latent_dim=D, knn_k=4)) as lk:
        for _ in range(6):
            lk.add_splats(g.standard_normal((3000, D)), labels=NAMES[g.integers(0, 4, 3000)])
        lk.estimate_kappa(threads=1)
        lk.compact(target_bytes=2 * sum(f.bytes for f in lk.manifest.shards[0].files) + (16 << 10))
        assert len(lk.manifest.shards) == 3
    return path


@pytest.mark.parametrize("edit", ["foreign", "drop first", "drop last", "vocabulary", "stale sidecar"])
def test_the_same_edits_are_refused_after_compaction(tmp_path: Path, edit: str) -> None:
    # observed: compaction wrote its merged files without stamps, so after it another lake's file listed in a
    # shard's place (checksum recomputed) was served: the other lake's rows and labels, verify() == []
    lake = _compacted(tmp_path / "lake", 0)
    if edit == "foreign":
        other = _compacted(tmp_path / "other", 1)
        theirs = json.loads(manifest_path(other).read_text())["shards"][1]["files"][0]
        shutil.copy(other / theirs["path"], lake / theirs["path"])
        edit_manifest(lake, lambda d: d["shards"][1]["files"].__setitem__(0, theirs))
        refused(lake, "belongs to another lake")
    elif edit.startswith("drop"):
        def drop(d: dict[str, Any]) -> None:
            gone = d["shards"].pop(0 if edit == "drop first" else -1)
            d["rows"] -= gone["rows"]
            d["geometry"]["rows"] -= gone["rows"]
        edit_manifest(lake, drop)
        refused(lake, "a shard dropped")
    elif edit == "vocabulary":
        edit_manifest(lake, lambda d: d["label_vocabulary"].reverse())
        refused(lake, "another label vocabulary")
    else:
        with open_lake(lake) as lk:
            lk.estimate_kappa(threads=1)   # a new geometry run; the old run's sidecar goes back in its place
        old = json.loads(sorted(manifest_path(lake).parent.glob("v*.json"))[-2].read_text())["shards"][0]["files"][-1]
        edit_manifest(lake, lambda d: d["shards"][0]["files"].__setitem__(-1, old))
        refused(lake, "stale sidecar")


def test_lake_id_removed_from_the_manifest_is_refused(lake: Path) -> None:
    edit_manifest(lake, lambda d: d.pop("lake_id"))
    refused(lake, "has no lake_id")


def test_format_downgrade_is_refused(lake: Path) -> None:
    # observed: format_version 1 with checksum/rows deleted was accepted by a format-2 lake
    edit_manifest(lake, lambda d: d.pop("lake_id"), as_format_1=True)
    refused(lake, "format")


def test_format_downgrade_of_a_lake_without_ids_is_refused(lake: Path) -> None:
    # the version before it was format 2: the listing tells, even without stamps to read
    for p in sorted(manifest_path(lake).parent.glob("v*.json"))[:-1]:
        doc = json.loads(p.read_text())
        doc.pop("lake_id", None)
        from m2m.lake.manifest import manifest_checksum
        doc["checksum"] = manifest_checksum(doc)
        p.write_text(json.dumps(doc))
    edit_manifest(lake, lambda d: d.pop("lake_id"), as_format_1=True)
    with pytest.raises(CorruptShardError, match="format downgrade|format-2 lake"):
        open_lake(lake)


def test_inflated_kappa_count_does_not_skip_the_estimate(tmp_path: Path) -> None:
    # observed: stats.kappa.count = rows -> kappa never estimated: NaN streamed, weights all 1.0
    path = tmp_path / "lake"
    g = np.random.default_rng(0)
    with create_m2m(M2MConfig(path=path, latent_dim=D, knn_k=4)) as lk:
        lk.add_splats(g.standard_normal((300, D)))
    edit_manifest(path, lambda d: d["stats"]["kappa"].update(count=300, sum=300.0, min=1.0, max=1.0))
    with open_lake(path) as lk:
        assert any("stats.kappa.count" in p for p in lk.verify())
        dl = lk.export_to_dataloader(batch_size=100, shuffle=False, importance_sampling="kappa",
                                     columns=("kappa", "weight"))
        batches = list(dl)
    kappa = np.concatenate([b["kappa"].numpy() for b in batches])
    weight = np.concatenate([b["weight"].numpy() for b in batches])
    assert not np.isnan(kappa).any()
    assert not np.allclose(weight, 1.0)


@pytest.mark.parametrize("value", ["many", [1], {"a": 1}, True])
def test_non_numeric_stats_kappa_is_one_line_error(lake: Path, value: Any) -> None:
    # observed: AttributeError at loader creation
    edit_manifest(lake, lambda d: d["stats"]["kappa"].update(count=value))
    with pytest.raises(CorruptShardError, match=r"stats\.kappa\.count") as exc:
        open_lake(lake)
    assert "\n" not in str(exc.value)
    edit_manifest(lake, lambda d: d["stats"].update(kappa="x"))
    with pytest.raises(CorruptShardError, match=r"stats\.kappa is not an object"):
        open_lake(lake)


def test_unknown_column_error_for_neighbors_of_a_later_append(lake: Path) -> None:
    with open_lake(lake) as lk:
        last = len(lk.manifest.shards) - 1
        with pytest.raises(UnknownColumnError) as exc:
            lk.snapshot.arrow_column(last, "neighbors")
    msg = str(exc.value)
    assert "missing from shard" in msg and "columns:" not in msg


# ------------------------------------------------------------------ signed lakes
def test_signed_lake_refuses_unsigned_and_wrongly_signed_manifests(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("M2M_LAKE_KEY", raising=False)
    path = tmp_path / "lake"
    with create_m2m(M2MConfig(path=path, latent_dim=D, lake_key="k1")) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((50, D)))
    doc = json.loads(manifest_path(path).read_text())
    assert doc["signature"].startswith("hmac-sha256:")
    with open_lake(path, lake_key="k1") as lk:
        assert len(lk) == 50 and lk.verify() == []
    for kwargs, match in [({}, "is signed: set the lake's key"), ({"lake_key": "k2"}, "does not match")]:
        with pytest.raises(SignatureError, match=match) as exc:
            open_lake(path, **kwargs)
        assert "\n" not in str(exc.value)
    monkeypatch.setenv("M2M_LAKE_KEY", "k1")        # the environment's key works as well
    with open_lake(path) as lk:
        assert len(lk) == 50
    monkeypatch.delenv("M2M_LAKE_KEY")
    # an attacker without the key: recomputes the checksum, drops or keeps the signature
    edit_manifest(path, lambda d: d.update(next_id=d["next_id"] + 7))
    with pytest.raises(SignatureError, match="does not match"):
        open_lake(path, lake_key="k1")
    edit_manifest(path, lambda d: d.pop("signature"))
    with pytest.raises(SignatureError, match="is not signed"):
        open_lake(path, lake_key="k1")
    r = cli("info", str(path))
    assert r.returncode != 0 and "Traceback" not in r.stderr


def _crcs(data: bytes, block: int) -> int:
    """The whole-file CRC32 and every block's CRC32C of ``data`` as one integer (what the manifest records)."""
    import crc32c

    out = zlib.crc32(data)
    for k, lo in enumerate(range(0, len(data), block)):
        out |= crc32c.crc32c(data[lo:lo + block]) << (32 * (k + 1))
    return out


def _forge_keeping_crcs(data: bytes, at: int, new: bytes, free: list[tuple[int, int]], block: int) -> bytes:
    """``data`` with ``new`` written at ``at`` and some of the ``free`` (byte, bit) flipped so that every CRC the
    manifest records stays the same: CRCs are linear over GF(2), so the flips that cancel the edit's change
    solve a linear system (what an attacker with write access and no key can do)."""
    out = bytearray(data)
    out[at:at + len(new)] = new
    edited = _crcs(bytes(out), block)
    target = edited ^ _crcs(data, block)
    basis: dict[int, tuple[int, int]] = {}
    for i, (byte, bit) in enumerate(free):
        flipped = bytearray(out)
        flipped[byte] ^= 1 << bit
        col, mask = _crcs(bytes(flipped), block) ^ edited, 1 << i
        while col:
            top = col.bit_length() - 1
            if top not in basis:
                basis[top] = (col, mask)
                break
            col, mask = col ^ basis[top][0], mask ^ basis[top][1]
    chosen = 0
    while target:
        top = target.bit_length() - 1
        target, chosen = target ^ basis[top][0], chosen ^ basis[top][1]
    for i, (byte, bit) in enumerate(free):
        if chosen >> i & 1:
            out[byte] ^= 1 << bit
    assert _crcs(bytes(out), block) == _crcs(data, block)
    return bytes(out)


@pytest.mark.parametrize("signed", [True, False])
def test_a_shard_changed_with_its_crcs_kept_is_refused_in_a_signed_lake(tmp_path: Path, signed: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # observed: a label changed in a signed lake's shard, the whole-file CRC32 and block CRC32Cs kept by flipping
    # bits of unestimated (NaN) kappas, was read and verified as it was: the manifest bound files by CRCs only
    monkeypatch.delenv("M2M_LAKE_KEY", raising=False)
    key = {"lake_key": "k1"} if signed else {}
    path = tmp_path / "lake"
    with create_m2m(M2MConfig(path=path, latent_dim=D, **key)) as lk:
        lk.add_splats(np.random.default_rng(0).standard_normal((100, D)), labels=np.arange(100) % 5)
        entry = lk.manifest.shards[0].files[0]
    assert (entry.sha256 is not None) == signed
    file = path / entry.path
    data = file.read_bytes()
    labels, nans = (np.arange(100) % 5).astype(np.int64).tobytes(), np.full(100, np.nan, np.float32).tobytes()
    at, free_at = data.find(labels), data.find(nans)
    assert at > 0 and free_at > 0
    free = [(free_at + 4 * i, b) for i in range(100) for b in range(2)]   # low mantissa bits: still NaN
    file.write_bytes(_forge_keeping_crcs(data, at, np.int64(4).tobytes(), free, entry.block_bytes or len(data)))
    with open_lake(path, **key) as lk:
        if not signed:   # what the docs say an unsigned lake does not detect: a writer forging consistent files
            assert lk[0]["label"] == 4 and lk.verify() == []
            return
        with pytest.raises(CorruptShardError, match=f"shard file .*{entry.path} is not the file the signed manifest"):
            lk[0]
        with pytest.raises(CorruptShardError, match="is not the file the signed manifest"):
            next(iter(lk.export_to_dataloader(batch_size=10, shuffle=False)))
        assert len(lk.verify()) == 1 and "signed manifest" in lk.verify()[0]


@pytest.mark.parametrize("damage", ["accident", "forgery"])
def test_repair_and_rollback_recover_a_signed_lake(tmp_path: Path, damage: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # observed: one digit changed in a signed lake's newest manifest read as "forged, or another key"
    # (SignatureError, checked before the checksum), and rollback and repair, which took only
    # CorruptShardError as "unreadable", failed on it: the documented recovery did not work on signed lakes
    from m2m.lake.recovery import rollback

    monkeypatch.delenv("M2M_LAKE_KEY", raising=False)
    path = tmp_path / "lake"
    with create_m2m(M2MConfig(path=path, latent_dim=D, lake_key="k1")) as lk:
        for seed in range(3):
            lk.add_splats(np.random.default_rng(seed).standard_normal((10, D)))
    head = manifest_path(path)
    if damage == "accident":
        head.write_text(head.read_text().replace('"created": 1', '"created": 2', 1))
        match = "is corrupt: checksum mismatch"
    else:   # an attacker without the key: content edited, checksum recomputed, the signature no longer matches
        edit_manifest(path, lambda d: d.update(next_id=d["next_id"] + 7))
        match = "signature does not match"
    for fails in (lambda: open_lake(path, lake_key="k1"), lambda: open_lake(path, lake_key="k2")):
        with pytest.raises((CorruptShardError, SignatureError)):
            fails()
    with pytest.raises((CorruptShardError, SignatureError), match=match):
        open_lake(path, lake_key="k1")
    monkeypatch.setenv("M2M_LAKE_KEY", "k2")        # another key: no version is readable, nothing moves
    with pytest.raises(CorruptShardError, match="no version .* is readable; nothing was moved"):
        repair(path)
    monkeypatch.setenv("M2M_LAKE_KEY", "k1")
    if damage == "accident":                        # repair moves it aside
        report = repair(path)
        assert [v for v, _, _ in report["moved"]] == [3] and report["head"] == 4
    else:                                           # rollback commits a copy of version 2 above it
        assert rollback(path, 2).version == 4
        report = repair(path)                       # the bad version 3 is older now: reported, left in place
        assert [v for v, _ in report["unreadable"]] == [3] and report["moved"] == []
    with open_lake(path) as lk:
        assert len(lk) == 20 and lk.verify() == [] and lk.version == 4


def test_lake_key_is_not_in_the_config_repr() -> None:
    assert "s3cret" not in repr(M2MConfig(lake_key="s3cret"))
    with pytest.raises(ConfigError):
        M2MConfig(lake_key="")


# ------------------------------------------------------------------ vacuum
def test_vacuum_keeps_stray_files_and_refuses_a_symlinked_data_dir(tmp_path: Path) -> None:
    # observed: vacuum() deleted _data/README.txt and notes.txt in the target of a symlinked _data
    path = tmp_path / "lake"
    g = np.random.default_rng(0)
    with create_m2m(M2MConfig(path=path, latent_dim=D)) as lk:
        lk.add_splats(g.standard_normal((10, D)))
        lk.add_splats(g.standard_normal((10, D)))
    (path / "_data" / "README.txt").write_text("mine")
    (path / "_data" / "sub").mkdir()
    os.symlink(tmp_path / "elsewhere.arrow", path / "_data" / ("ab" * 16 + ".arrow"))
    (tmp_path / "elsewhere.arrow").write_text("not the lake's")
    (path / "_manifests" / "notes.json").write_text("{}")
    # an unreferenced shard file (an interrupted commit) does go
    orphan = path / "_data" / ("cd" * 16 + ".arrow")
    orphan.write_bytes(b"x")
    with open_lake(path) as lk:
        r = lk.vacuum()
    assert r["files_removed"] == 1 and not orphan.exists()
    assert (path / "_data" / "README.txt").exists() and (path / "_data" / "sub").is_dir()
    assert (tmp_path / "elsewhere.arrow").exists() and (path / "_manifests" / "notes.json").exists()

    real = tmp_path / "real_data"
    shutil.move(str(path / "_data"), real)
    os.symlink(real, path / "_data")
    (real / "notes.txt").write_text("keep me")
    with open_lake(path) as lk:
        with pytest.raises(ConfigError, match="is a symlink") as exc:
            lk.vacuum()
        assert "\n" not in str(exc.value)
        assert (real / "notes.txt").exists()
        lk.vacuum(allow_symlinked_dirs=True)
        assert (real / "notes.txt").exists() and (real / "README.txt").exists()
        assert lk.verify() == []
    r2 = cli("vacuum", str(path))
    assert r2.returncode != 0 and "symlink" in r2.stderr and "Traceback" not in r2.stderr
    assert cli("vacuum", "--allow-symlinked-dirs", str(path)).returncode == 0


# ------------------------------------------------------------------ manifest listing
def test_fifo_and_directory_named_like_a_manifest_are_skipped(lake: Path, caplog: pytest.LogCaptureFixture) -> None:
    # observed: a FIFO hangs open_lake, m2m info and m2m repair; a directory breaks repair
    os.mkfifo(lake / "_manifests" / "v0000000098.json")
    (lake / "_manifests" / "v0000000099.json").mkdir()
    with caplog.at_level(logging.WARNING, logger="m2m.lake.manifest"):
        with open_lake(lake) as lk:
            assert lk.version < 98
    assert "v0000000098.json: a FIFO, not a manifest" in caplog.text
    assert "v0000000099.json: a folder, not a manifest" in caplog.text
    for args in (("info", str(lake)), ("verify", "-q", str(lake))):
        r = cli(*args, timeout=60)
        assert r.returncode == 0, (args, r.stderr)
    r = cli("repair", str(lake), timeout=60)  # above the head: moved aside (they would block those commits)
    assert r.returncode == 0 and r.stdout.count(".stray-") == 2, r.stdout
    assert repair(lake)["moved"] == []
    assert sorted(p.name.split(".stray-")[0] for p in (lake / "_manifests").glob("*.stray-*")) == [
        "v0000000098.json", "v0000000099.json"]


@pytest.mark.parametrize("entry", ["folder", "dangling link", "fifo"])
def test_an_entry_where_the_next_manifest_goes_is_named_and_repair_moves_it(lake: Path, tmp_path: Path,
                                                                             entry: str) -> None:
    # observed: a folder (or a dangling link) named like the next manifest made every commit fail with
    # "committed by another writer", forever, while verify and repair said the lake was fine
    with open_lake(lake) as lk:
        nxt = lake / "_manifests" / f"v{lk.version + 1:010d}.json"
        rows = len(lk)
    if entry == "folder":
        nxt.mkdir()
    elif entry == "fifo":
        os.mkfifo(nxt)
    else:
        nxt.symlink_to(tmp_path / "nothing-here")
    with open_lake(lake) as lk:
        with pytest.raises(CorruptShardError, match=f"cannot commit version {lk.version + 1}: .*{nxt.name} is a"
                                                    r".*m2m repair") as info:
            lk.add_splats(np.ones((2, lk.dim), np.float32), labels=NAMES[:2])
        assert "\n" not in str(info.value)
    r = cli("repair", str(lake), timeout=60)
    assert r.returncode == 0 and f"{nxt.name}.stray-" in r.stdout, r.stdout
    assert not os.path.lexists(nxt) and not (tmp_path / "nothing-here").exists()
    with open_lake(lake) as lk:
        lk.add_splats(np.ones((2, lk.dim), np.float32), labels=NAMES[:2])
        assert len(lk) == rows + 2
    assert cli("verify", "-q", str(lake), timeout=60).returncode == 0


def test_names_are_checked_to_the_true_end(lake: Path) -> None:
    with pytest.raises(ValueError):
        check_file_path("_data/abc.arrow\n")
    newest = manifest_path(lake)
    shutil.copy(newest, lake / "_manifests" / "v0000000050.json\n")
    with open_lake(lake) as lk:
        assert lk.version < 50


def test_neighbours_of_rows_appended_after_estimate_kappa_read_as_none(lake: Path) -> None:
    # observed: Snapshot.read_all("neighbors") raised UnknownColumnError after an append following
    # estimate_kappa; such rows read -1 (no neighbour), cosine NaN, kappa NaN. A stream asking for those
    # columns computes the geometry in memory for every row (since 2026-12-07: a plain stream delivered
    # the gaps where an augmented one delivered the estimate), at the k the lake was estimated with
    with open_lake(lake) as lk:
        snap = lk.snapshot
        nbr, cos, kappa = snap.read_all("neighbors"), snap.read_all("neighbor_cos"), snap.read_all("kappa")
        assert nbr.shape == (1200, 4) and cos.shape == (1200, 4) and nbr.dtype == np.int64
        assert (nbr[900:] == -1).all() and np.isnan(cos[900:]).all() and np.isnan(kappa[900:]).all()
        assert (nbr[:900] >= 0).all() and not np.isnan(cos[:900]).any() and not np.isnan(kappa[:900]).any()
        assert (snap.gather("neighbors", np.array([0, 950]))[1] == -1).all()
        assert lk.config.knn_k == 4  # opened without a config: the k of its estimate
        names = ("id", "neighbors", "kappa")
        dl = lk.export_to_dataloader(batch_size=200, shuffle=False, columns=names)
        got = {k: np.concatenate([b[k].numpy() for b in dl]) for k in names}
        dl.close()
        lk.estimate_kappa()
        persisted = lk.snapshot.read_all("neighbors"), lk.snapshot.read_all("kappa")
    assert np.array_equal(got["id"], np.arange(1200))
    assert np.array_equal(got["neighbors"], persisted[0]) and np.array_equal(got["kappa"], persisted[1])
