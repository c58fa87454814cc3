"""Temporary lakes (no path) leave nothing behind: removed at interpreter exit even when never closed,
and a later `create_m2m` removes those of processes that are gone (only m2m's own folders, never
through a symlink)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m
from m2m.lake import tempdirs

SNIPPET = """
import sys
import numpy as np
from m2m import M2MConfig, create_m2m
lake = create_m2m(M2MConfig(latent_dim=8))
lake.add_splats(np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32))
{extra}
print(lake.path, flush=True)
{end}
"""


def _run(tmp_path, extra: str = "", end: str = "") -> tuple[subprocess.CompletedProcess, str]:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", SNIPPET.format(extra=extra, end=end)], env=env,
                       capture_output=True, text=True, timeout=120)
    path = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return r, path


def test_unclosed_temporary_lake_is_removed_at_exit(tmp_path):
    r, path = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert path.startswith(str(tmp_path)) and os.path.basename(path).startswith("m2m-lake-")
    assert not os.path.exists(path)
    assert [p for p in os.listdir(tmp_path) if p.startswith("m2m-lake-")] == []


@pytest.mark.slow
def test_unclosed_temporary_lake_with_a_live_loader_is_removed_at_exit(tmp_path):
    extra = "dl = lake.export_to_dataloader(batch_size=16)\nit = iter(dl)\nnext(it)"
    r, path = _run(tmp_path, extra=extra)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(path)


def test_a_killed_owner_s_lake_is_removed_by_the_next_create(tmp_path, monkeypatch):
    r, path = _run(tmp_path, end="import os; os._exit(0)")   # no atexit: the folder stays
    assert r.returncode == 0, r.stderr
    assert os.path.isdir(path)
    owner = json.loads(open(os.path.join(path, tempdirs.OWNER_FILE)).read())
    assert owner["pid"] != os.getpid()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with create_m2m(M2MConfig(latent_dim=8)) as lake:
        assert not os.path.exists(path)
        assert os.path.isdir(lake.path)
        lake.add_splats(np.ones((3, 8), np.float32))
    assert not os.path.exists(lake.path)


def _fake(root, name: str, pid: int, start: str | None = None) -> str:
    path = os.path.join(root, name)
    os.makedirs(path)
    with open(os.path.join(path, tempdirs.OWNER_FILE), "w") as f:
        json.dump({"pid": pid, "start": start, "created": 0}, f)
    open(os.path.join(path, "data"), "w").close()
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sweep_removes_only_m2m_folders_of_gone_owners(tmp_path):
    dead = _dead_pid()
    gone = _fake(tmp_path, "m2m-lake-gone", dead)
    mine = _fake(tmp_path, "m2m-lake-mine", os.getpid(), tempdirs._start_time(os.getpid()))
    reused = _fake(tmp_path, "m2m-lake-reused", os.getpid(), "1")  # our pid, another start time
    other = os.path.join(tmp_path, "m2m-lake-nomarker")
    os.makedirs(other)
    unrelated = _fake(tmp_path, "not-m2m", dead)
    # a symlink named like a temporary lake, pointing at a folder whose marker names a dead process
    target = _fake(tmp_path, "target", dead)
    link = os.path.join(tmp_path, "m2m-lake-link")
    os.symlink(target, link)
    # a marker that is itself a symlink to a valid-looking owner file
    sneaky = os.path.join(tmp_path, "m2m-lake-sneaky")
    os.makedirs(sneaky)
    os.symlink(os.path.join(gone, tempdirs.OWNER_FILE), os.path.join(sneaky, tempdirs.OWNER_FILE))

    removed = tempdirs.sweep(str(tmp_path))

    expected = {gone}
    if tempdirs._start_time(os.getpid()) is not None:
        expected.add(reused)
    assert set(removed) == expected
    for kept in (mine, other, unrelated, target, link, sneaky):
        assert os.path.lexists(kept), kept
    assert os.path.exists(os.path.join(target, "data"))


def test_a_forked_child_never_removes_its_parent_s_lake(tmp_path, monkeypatch):
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lake = create_m2m(M2MConfig(latent_dim=8))
    lake.add_splats(np.ones((3, 8), np.float32))
    pid = os.fork()
    if pid == 0:  # the child drops its copy of the lake and exits through the normal path
        try:
            lake._remove_temporary()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.isdir(lake.path)
    lake.close()
    assert not os.path.exists(lake.path)


def test_a_private_shard_cache_of_a_gone_process_is_swept_by_the_next_one(tmp_path, monkeypatch):
    # a forked DataLoader worker that opened a remote lake ends through os._exit: its private cache's
    # finalizer never runs (review, 2026-12-07); the next private cache removes it, as temporary lakes are
    from m2m.lake.cache import ShardCache

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = _fake(tmp_path, "m2m-cache-gone", _dead_pid())
    with open(os.path.join(gone, "0" * 40 + ".shard"), "wb") as f:
        f.write(b"x" * 100)
    alive = _fake(tmp_path, "m2m-cache-alive", os.getpid())
    cache = ShardCache(None, "bucket/lake", "s3://bucket/lake")
    assert not os.path.exists(gone) and os.path.isdir(alive)
    assert os.path.exists(os.path.join(cache.dir, tempdirs.OWNER_FILE))
    cache.close()
    assert not os.path.exists(cache.dir)
