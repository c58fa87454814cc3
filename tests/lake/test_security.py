"""Issue 11 item 2 (security): manifest file names can never reach outside the lake or the cache.

File names are refused when the manifest is parsed, before any file is opened, downloaded or
created; the remote shard cache also refuses, by itself, any path that leaves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import CorruptShardError
from m2m.lake.fs import FsspecFS
from m2m.lake.manifest import Manifest, manifest_checksum
from tests.lake.manifest_edit import edit_manifest

D = 4
ESCAPE = "_data/../../../ESCAPED.arrow"


def all_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def escaped_anywhere(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        found += [str(p) for p in root.rglob("ESCAPED*")]
    return found


class _StoreOnDisk(LocalFileSystem):
    """fsspec's local filesystem under a protocol m2m does not know, so that a lake named by it takes the
    object-store path (`FsspecFS`) over files a test can see (``local://`` is a local lake since
    2026-12-07)."""

    protocol = ("m2mtest-disk",)

    @classmethod
    def _strip_protocol(cls, path):  # type: ignore[no-untyped-def]
        return super()._strip_protocol(str(path).removeprefix("m2mtest-disk://"))


fsspec.register_implementation("m2mtest-disk", _StoreOnDisk, clobber=True)


@pytest.fixture(params=["memory", "local"])
def remote_lake(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A lake behind fsspec (memory://, or local files under a test protocol, through FsspecFS), its
    shard cache deep in tmp_path."""
    cache = tmp_path / "a" / "b" / "c" / "cache"
    monkeypatch.setenv("M2M_CACHE_DIR", str(cache))
    if request.param == "memory":
        url = f"memory://m2m-sec-{uuid.uuid4().hex}/x/y/lake"
    else:
        url = f"m2mtest-disk://{tmp_path}/remote/x/y/lake"
    fs, root = fsspec.core.url_to_fs(url)
    with create_m2m(M2MConfig(path=url, latent_dim=D)) as lake:
        fs.makedirs(f"{root}/_ids", exist_ok=True)  # a local store needs the id-reservation folder to exist
        lake.add_splats(np.random.default_rng(0).standard_normal((50, D)))
    yield url, fs, root.rstrip("/"), cache
    if request.param == "memory":
        fs.rm(root.split("/x/")[0], recursive=True)


def test_traversal_in_a_remote_manifest_touches_nothing(remote_lake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, fs, root, cache = remote_lake
    versions = sorted(p for p in fs.ls(f"{root}/_manifests", detail=False) if p.endswith(".json"))
    newest = versions[-1]
    doc = json.loads(fs.cat_file(newest))
    entry = doc["shards"][0]["files"][0]
    target = os.path.normpath(f"{root}/{ESCAPE}")            # where a naive join would fetch from
    fs.pipe_file(target, fs.cat_file(f"{root}/{entry['path']}"))  # the object exists: a download would work
    entry["path"] = ESCAPE
    doc["checksum"] = manifest_checksum(doc)                 # a consistent, malicious manifest
    fs.pipe_file(newest, json.dumps(doc).encode())
    import shutil

    shutil.rmtree(cache)                                     # nothing cached: reading would download
    planted = escaped_anywhere(tmp_path, Path.cwd())         # the local variant's planted object
    before = all_files(tmp_path)
    with pytest.raises(CorruptShardError, match=r"not a plain file name inside _data/"):
        open_lake(url)
    with pytest.raises(CorruptShardError):
        open_lake(url, verify_reads=False)
    after = all_files(tmp_path)
    created = sorted(after - before)
    assert escaped_anywhere(tmp_path, Path.cwd()) == planted, created
    assert all(p.startswith(str(cache)) for p in created), created   # at most the (empty) cache dirs
    assert not [p for p in created if os.path.isfile(p)], created


def test_the_shard_cache_refuses_paths_that_leave_it(remote_lake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, fs, root, _ = remote_lake
    target = os.path.normpath(f"{root}/{ESCAPE}")
    fs.pipe_file(target, b"x" * 100)
    rfs = FsspecFS(url)
    before = all_files(tmp_path)
    for rel in (ESCAPE, "/etc/passwd", "_data/../../x.arrow", "../ESCAPED.arrow"):
        with pytest.raises(CorruptShardError, match="leaves the shard cache"):
            rfs.local_path(rel)
        with pytest.raises(CorruptShardError, match="leaves the shard cache"):
            rfs.remove(rel)
    assert all_files(tmp_path) == before                     # nothing created, nothing removed


def test_a_symlinked_cache_folder_is_refused(remote_lake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, fs, root, _ = remote_lake
    rfs = FsspecFS(url)
    outside = tmp_path / "outside"
    outside.mkdir()
    m = json.loads(fs.cat_file(sorted(fs.ls(f"{root}/_manifests", detail=False))[-1]))
    rel = m["shards"][0]["files"][0]["path"]
    # a symlink planted where the shard would be cached (e.g. by another user of a shared /tmp)
    planted = Path(rfs.cache.dir, rfs.cache.name(rel) + ".shard")
    planted.unlink(missing_ok=True)
    planted.symlink_to(outside / "stolen.arrow")
    with pytest.raises(CorruptShardError, match="leaves the shard cache"):
        rfs.local_path(rel)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("prefix", ["", "_data/"])
@pytest.mark.parametrize("as_format_1", [False, True])
def test_local_manifest_pointing_at_etc_passwd_fails_verify(tmp_path: Path, prefix: str, as_format_1: bool) -> None:
    secret = Path("/etc/passwd")
    if not secret.is_file():
        pytest.skip("no /etc/passwd here")
    data = secret.read_bytes()
    lake_dir = tmp_path / "lake"
    with create_m2m(M2MConfig(path=lake_dir, latent_dim=D)) as lake:
        lake.add_splats(np.ones((3, D)))

    def point(doc: dict) -> None:  # type: ignore[type-arg]
        doc["shards"][0]["files"][0].update(path=f"{prefix}../../../../etc/passwd", bytes=len(data),
                                            crc32=zlib.crc32(data))

    edit_manifest(lake_dir, point, as_format_1=as_format_1)
    r = subprocess.run([sys.executable, "-m", "m2m.cli.main", "verify", "-q", str(lake_dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
    assert "ok:" not in r.stdout and "not a plain file name" in r.stderr and "etc/passwd" in r.stderr
    with pytest.raises(CorruptShardError, match="not a plain file name"):
        open_lake(lake_dir)


BAD_PATHS = ["/etc/passwd", "_data//etc/passwd", "_data/../x.arrow", "_data/a/b.arrow", "_data\\..\\x.arrow",
             "_data/", "", "_data/.tmp-x.arrow", "_data/..", "_data/.", "_data/x\x00.arrow", "_data/\u00e9.arrow",
             "C:\\x.arrow", "_data/x\n.arrow", "data/x.arrow", "./_data/x.arrow", "_data/" + "a" * 300,
             "_data/x..arrow", "_data/-rf.arrow", "_data/x.arrow/", "_data/x y.arrow", "~/x.arrow", 5, None,
             ["_data/x.arrow"]]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_bad_file_names_are_refused_at_parse(tmp_path: Path, bad: object) -> None:
    lake_dir = tmp_path / "lake"
    with create_m2m(M2MConfig(path=lake_dir, latent_dim=D)) as lake:
        lake.add_splats(np.ones((3, D)))
    path = edit_manifest(lake_dir, lambda d: d["shards"][0]["files"][0].update(path=bad))
    with pytest.raises(CorruptShardError, match="file path .* is not"):
        Manifest.from_json(path.read_bytes(), "m")      # parsing alone refuses it: no filesystem involved
    with pytest.raises(CorruptShardError, match="is not"):
        open_lake(lake_dir)


def test_good_names_still_parse() -> None:
    from m2m.lake.manifest import check_file_path

    for ok in ("_data/0123abcd.arrow", "_data/x", "_data/a-b_c.d.arrow", "_data/_x.arrow"):
        assert check_file_path(ok) == ok
