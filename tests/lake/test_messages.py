"""Issue 11 item 5 (outside ingest): clear messages for mixed metadata, extreme finite rows, full disks."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import InvalidEmbeddingError

D = 8


def _state(path: Path) -> tuple:  # type: ignore[type-arg]
    return tuple(sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.name != "_lock"))


@pytest.fixture
def lake(tmp_path: Path):  # type: ignore[no-untyped-def]
    with create_m2m(M2MConfig(path=tmp_path / "lake", latent_dim=D)) as lk:
        lk.add_splats(np.ones((2, D)), metadata={"m": np.array(["a", "b"], dtype=object)})
        yield lk


@pytest.mark.parametrize("values, row, msg", [
    ([1, "a"], 1, r"metadata\['m'\] row 1 is 'a' \(str\), but the column holds int values"),
    (["a", "b", 3], 2, r"metadata\['m'\] row 2 is 3 \(int\), but the column holds str values"),
    (["a", b"b", 2.5], 2, r"metadata\['m'\] row 2 is 2.5 \(float\)"),
    (["a", ["x"]], 1, r"metadata\['m'\] row 1 is \['x'\] \(list\)"),
])
def test_mixed_type_object_metadata_names_column_and_row(lake, values, row: int, msg: str) -> None:  # type: ignore[no-untyped-def]
    # observed: a raw "ArrowTypeError: Expected bytes, got a 'int' object" from a writer thread
    before = _state(Path(lake.path))
    n = len(values)
    with pytest.raises(InvalidEmbeddingError, match=msg):
        lake.add_splats(np.ones((n, D)), metadata={"m": np.array(values, dtype=object)})
    assert _state(Path(lake.path)) == before


def test_object_columns_of_one_type_are_kept(tmp_path: Path) -> None:
    with create_m2m(M2MConfig(path=tmp_path / "l2", latent_dim=D)) as lake:
        lake.add_splats(np.ones((3, D)), metadata={"s": np.array(["x", None, "z"], dtype=object),
                                                   "n": np.array([1, 2.5, 3], dtype=object),
                                                   "i": np.array([1, 2, 3], dtype=object)})
        s = lake.splats()
        assert s["s"].tolist() == ["x", None, "z"]
        assert s["n"].tolist() == [1.0, 2.5, 3.0] and s["i"].tolist() == [1, 2, 3]
        assert lake.manifest.metadata == {"s": "string", "n": "double", "i": "int64"}


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-200, 1e30, 1e-30, 5e-324])
def test_extreme_finite_float64_rows_are_normalised_exactly(tmp_path: Path, scale: float) -> None:
    # observed: 1e300 reported as "NaN or Inf", 1e-300 as "a zero vector"
    direction = np.array([3.0, -4.0, 0, 0, 0, 0, 0, 12.0]) / 13.0
    rows = np.stack([direction * scale, np.abs(direction) * scale])
    if scale == 5e-324:    # the smallest subnormal: one non-zero value
        rows = np.zeros((2, D))
        rows[0, 0] = scale
        rows[1, 1] = -scale
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=D)) as lake:
        lake.add_splats(rows)
        mu = lake.splats()["mu"]
    want = rows / np.linalg.norm(rows / np.abs(rows).max(axis=1, keepdims=True), axis=1, keepdims=True) \
        / np.abs(rows).max(axis=1, keepdims=True)
    np.testing.assert_allclose(mu, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(mu, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-25, 1e-40, 3e38, 1e20])
def test_extreme_finite_float32_rows_are_normalised(tmp_path: Path, scale: float) -> None:
    rows = (np.array([[1, 2, 0, 0, 0, 0, 0, 2]], dtype=np.float32) * np.float32(scale / 2)).astype(np.float32)
    assert np.isfinite(rows).all() and (rows != 0).any()
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=D)) as lake:
        lake.add_splats(rows)
        mu = lake.splats()["mu"]
    np.testing.assert_allclose(mu[0, [0, 1, 7]], [1 / 3, 2 / 3, 2 / 3], rtol=1e-5)


@pytest.mark.parametrize("bad, msg", [(np.nan, "row 1 contains NaN or Inf"), (np.inf, "row 1 contains NaN or Inf"),
                                      (0.0, "row 1 is a zero vector")])
def test_only_true_nan_inf_and_zero_rows_are_refused(tmp_path: Path, bad: float, msg: str) -> None:
    rows = np.array([[1e300] * D, [bad] * D])
    with create_m2m(M2MConfig(path=tmp_path / "l", latent_dim=D)) as lake:
        with pytest.raises(InvalidEmbeddingError, match=msg):
            lake.add_splats(rows)


def _enospc_at(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make the first fsync of a file whose path contains ``where`` fail with ENOSPC."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if where in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("where, name", [("/_data/", "shard file"), ("/_manifests/.tmp-", "v0000000002.json")])
def test_enospc_names_the_file_and_leaves_the_lake_unchanged(lake, monkeypatch: pytest.MonkeyPatch,
                                                            where: str, name: str) -> None:  # type: ignore[no-untyped-def]
    root = Path(lake.path)
    before = _state(root)
    _enospc_at(monkeypatch, where)
    with pytest.raises(OSError) as exc:
        lake.add_splats(np.ones((5, D)), metadata={"m": np.array(list("abcde"), dtype=object)})
    assert exc.value.errno == errno.ENOSPC
    assert name in str(exc.value) and str(root) in str(exc.value)
    monkeypatch.undo()
    assert _state(root) == before
    with open_lake(root) as again:
        assert again.version == 1 and len(again) == 2 and again.verify() == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 256 KiB filesystem (root only: skipped elsewhere)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def test_a_real_full_disk_names_the_file_and_leaves_the_lake_unchanged(tiny_tmpfs: Path) -> None:
    root = tiny_tmpfs / "lake"
    with create_m2m(M2MConfig(path=root, latent_dim=64)) as lake:
        lake.add_splats(np.random.default_rng(0).standard_normal((100, 64)))
        before = _state(root)
        with pytest.raises(OSError) as exc:
            lake.add_splats(np.random.default_rng(1).standard_normal((4000, 64)))   # ~1 MB: does not fit
        assert exc.value.errno == errno.ENOSPC and str(root) in str(exc.value)
        assert _state(root) == before and lake.version == 1
    with open_lake(root) as again:
        assert len(again) == 100 and again.verify() == []


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_fifo_or_folder_under_a_shards_name_is_one_line_not_a_hang(tmp_path, kind):
    # observed: a FIFO in place of a shard file hung open_lake, `m2m verify` and `m2m vacuum` forever (opening
    # a FIFO blocks until a writer appears); run in a child so that a hang fails the test instead of the suite
    import sys

    path = tmp_path / "l"
    with create_m2m(M2MConfig(path=path, latent_dim=4)) as lake:
        lake.add_splats(np.eye(4))
        shard = path / lake.manifest.files()[0].path
    shard.unlink()
    os.mkfifo(shard) if kind == "fifo" else shard.mkdir()
    what = "a FIFO" if kind == "fifo" else "a folder"
    for cmd in ([sys.executable, "-c", f"import m2m; m2m.open_lake({str(path)!r})"],
                [sys.executable, "-m", "m2m.cli.main", "verify", str(path)],
                [sys.executable, "-m", "m2m.cli.main", "vacuum", str(path)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"shard file {shard} is {what}, not a regular file" in r.stderr, r.stderr


def test_rollback_and_repair_pass_a_fifo_among_unreferenced_files(tmp_path):
    # a review found repair and rollback, reading the next_id stamps of unreferenced files, hanging on a FIFO
    # named like a shard file (with the write lock held); run in a child so that a hang fails the test
    import sys

    path = tmp_path / "l"
    with create_m2m(M2MConfig(path=path, latent_dim=4)) as lake:
        for _ in range(3):
            lake.add_splats(np.eye(4))
    os.mkfifo(path / "_data" / ("0" * 32 + ".arrow"))
    head = path / "_manifests" / "v0000000003.json"
    head.write_bytes(head.read_bytes()[:40])
    for cmd in (["rollback", str(path), "--to", "1"], ["repair", str(path)]):
        r = subprocess.run([sys.executable, "-m", "m2m.cli.main", *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

