"""A format-1 lake made by an older m2m (tests/fixtures/lake_v1) must keep opening, reading, verifying
and streaming exactly the content recorded when it was made (like lance's tests/compat)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m2m import open_lake

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXPECTED = json.loads((FIXTURES / "lake_v1_expected.json").read_text())


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def text_digest(a: np.ndarray) -> str:
    return hashlib.sha256("\n".join(str(v) for v in a.tolist()).encode()).hexdigest()


@pytest.fixture
def v1_lake(tmp_path: Path) -> Path:
    """A private copy: reading never writes, but the write tests below do."""
    dst = tmp_path / "lake_v1"
    shutil.copytree(FIXTURES / "lake_v1", dst)
    return dst


def check_content(lake, want: dict) -> None:  # type: ignore[no-untyped-def]
    assert lake.version == want["version"]
    assert len(lake) == want["rows"]
    if want["rows"] == 0:
        return
    m = lake.manifest
    assert (lake.dim, m.dtype, m.next_id, len(m.shards), len(m.files())) == (
        want["dim"], want["dtype"], want["next_id"], want["shards"], want["files"])
    s = lake.splats()
    assert digest(s["id"].astype(np.int64)) == want["id_sha256"]
    assert digest(s["mu"].astype(np.float32)) == want["mu_sha256"]
    assert digest(s["kappa"].astype(np.float32)) == want["kappa_sha256"]
    assert digest(s["alpha"].astype(np.float32)) == want["alpha_sha256"]
    assert digest(s["source"].astype(np.int64)) == want["source_sha256"]
    assert text_digest(s["label"]) == want["label_sha256"]
    assert text_digest(s["note"]) == want["note_sha256"]
    assert int(np.isnan(s["kappa"]).sum()) == want["kappa_nan"]
    assert s["mu"][0].astype(float).tolist() == want["mu_first_row"]
    first = want["first_row"]
    assert (int(s["id"][0]), str(s["label"][0]), int(s["source"][0]), str(s["note"][0])) == (
        first["id"], first["label"], first["source"], first["note"])
    if "neighbors_sha256" in want:
        assert digest(lake.snapshot.read_all("neighbors")) == want["neighbors_sha256"]
        assert digest(lake.snapshot.read_all("neighbor_cos").astype(np.float32)) == want["neighbor_cos_sha256"]


def test_fixture_is_a_format_1_lake() -> None:
    for path in sorted((FIXTURES / "lake_v1" / "_manifests").glob("v*.json")):
        assert json.loads(path.read_text())["format_version"] == 1, path


def test_every_version_opens_and_reads_the_recorded_content(v1_lake: Path) -> None:
    with open_lake(v1_lake) as lake:
        assert lake.version == EXPECTED["latest"]
        assert lake.versions() == sorted(int(v) for v in EXPECTED["versions"])
        check_content(lake, EXPECTED["versions"][str(EXPECTED["latest"])])
    for v, want in EXPECTED["versions"].items():
        with open_lake(v1_lake, version=int(v)) as lake:
            check_content(lake, want)


def test_verify_and_stream(v1_lake: Path) -> None:
    want = EXPECTED["versions"][str(EXPECTED["latest"])]
    with open_lake(v1_lake) as lake:
        assert lake.verify() == []
        ref = lake.splats()
        order = np.argsort(ref["id"])
        for shuffle in (False, True):
            dl = lake.export_to_dataloader(batch_size=64, shuffle=shuffle, columns=("id", "embedding"))
            ids, mu = [], []
            for batch in dl:
                ids.append(batch["id"].numpy())
                mu.append(batch["embedding"].numpy())
            got_ids, got_mu = np.concatenate(ids), np.concatenate(mu)
            assert sorted(got_ids.tolist()) == ref["id"].tolist()   # every row once
            pos = np.searchsorted(ref["id"][order], got_ids)
            np.testing.assert_array_equal(got_mu, ref["mu"][order][pos])
        assert len(ref["id"]) == want["rows"]


def test_cli_verify_reports_ok(v1_lake: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "m2m.cli.main", "verify", "-q", str(v1_lake)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{EXPECTED['versions'][str(EXPECTED['latest'])]['rows']:,} rows" in r.stdout


def test_a_new_commit_on_a_v1_lake_keeps_the_old_versions_readable(v1_lake: Path) -> None:
    latest = EXPECTED["latest"]
    with open_lake(v1_lake) as lake:
        before = lake.splats()
        new_ids = lake.add_splats(np.eye(8, dtype=np.float32)[:3], labels=["cat", "cow", "dog"],
                                  metadata={"source": np.array([1, 2, 3]), "note": np.array(["a", "b", "c"])})
        assert new_ids.tolist() == [EXPECTED["versions"][str(latest)]["next_id"] + i for i in range(3)]
        after = lake.splats()
        np.testing.assert_array_equal(after["id"][:-3], before["id"])
        np.testing.assert_array_equal(after["mu"][:-3], before["mu"])
        assert after["label"][-3:].tolist() == ["cat", "cow", "dog"]
        assert lake.verify() == []
    for v, want in EXPECTED["versions"].items():
        with open_lake(v1_lake, version=int(v)) as old:
            check_content(old, want)
