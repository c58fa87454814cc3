"""Fault injection: a shard cut short the moment a read path opens it gives `CorruptShardError`
naming the file, never a signal (issue 18 item 2).

Each path runs in a child process (`truncate_victim.py`) that truncates every shard file to half
its size right after it is opened or memory-mapped. m2m 43de0e0 memory-mapped shards in the
footer check, `column_extents`, `verify`, export, `to_arrow` and `Snapshot` reads; with a cut after
every open its ``open_lake`` died with SIGBUS (-7). Paths beyond the five fast ones are slow tests.

Ingest reads a user's file: a .npy or Arrow IPC input cut when it is opened for its rows, or after
its first chunk, gives a one-line `InvalidEmbeddingError` naming the file (m2m 97e5c3f read Arrow
IPC inputs through ``pyarrow.memory_map`` and .npy headers through ``np.load(mmap_mode="r")``: the
Arrow cases died with SIGBUS, cut at the open, at the map or after the first chunk).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from m2m.api import create_m2m
from m2m.config import M2MConfig

VICTIM = os.path.join(os.path.dirname(__file__), "truncate_victim.py")
FAST = ["open_lake", "stream0", "verify", "to_arrow", "read_all"]
SLOW = ["stream2", "cli_verify", "export", "cli_export", "to_arrow_stream", "splats", "gather", "ids"]
CASES = ([pytest.param(p, "open", id=f"{p}-open") for p in FAST]
         + [pytest.param(p, how, id=f"{p}-{how}", marks=pytest.mark.slow)
            for p in SLOW for how in ("open", "map")]
         + [pytest.param(p, "map", id=f"{p}-map", marks=pytest.mark.slow) for p in FAST])


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cut") / "lake")
    rng = np.random.default_rng(0)
    rows = 3000
    with create_m2m(M2MConfig(path=path, latent_dim=64, shard_bytes=1 << 18)) as lake:
        lake.add_splats(rng.standard_normal((rows, 64)).astype(np.float32), labels=rng.integers(0, 5, rows),
                        metadata={"source": np.array([f"s{i % 7}" for i in range(rows)], dtype=object)})
    return path


INGEST = ([pytest.param(p, "open", id=f"{p}-open") for p in ("ingest_npy", "ingest_arrow")]
          + [pytest.param(p, "map", id=f"{p}-map", marks=pytest.mark.slow) for p in ("ingest_npy", "ingest_arrow")]
          + [pytest.param(p, "none", id=p) for p in ("ingest_npy_mid", "ingest_arrow_mid")])


def _victim(lake: str, path: str, how: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("M2M_TEST_CUT_DIR", None)
    env["M2M_TEST_CUT_DIR_ON"] = how
    return subprocess.run([sys.executable, VICTIM, lake, path], check=False, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("path,how", INGEST)
def test_an_ingest_input_cut_while_read_is_one_line_error_naming_it(tmp_path, path, how):
    proc = _victim(str(tmp_path / "lake"), path, how)
    assert proc.returncode >= 0, f"{path}: killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, f"{path}: exit {proc.returncode}: {proc.stderr[-2000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    if how == "map":  # only a memory map is cut: nothing maps the input, so all of it is read
        assert last == "OK 3000 of 3000", (path, last)
        return
    assert last.startswith("ERROR InvalidEmbeddingError "), (path, last, proc.stderr[-2000:])
    assert "MORE THAN ONE LINE" not in last
    assert os.path.join("input", "x.npy" if "npy" in path else "x.arrow") in last, last
    assert not os.listdir(tmp_path / "new" / "_data") if (tmp_path / "new" / "_data").exists() else True


@pytest.mark.parametrize("path,how", CASES)
def test_a_shard_cut_when_opened_is_corrupt_shard_error_not_a_signal(template, tmp_path, path, how):
    # how="open": cut after every open (every path must then fail cleanly); how="map": cut only
    # right after a memory map (what killed m2m 43de0e0; nothing maps now, so the data reads whole)
    lake = str(tmp_path / "lake")
    shutil.copytree(template, lake)
    proc = _victim(lake, path, how)
    assert proc.returncode >= 0, f"{path}: killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, f"{path}: exit {proc.returncode}: {proc.stderr[-2000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    if how == "map" and last.startswith("OK"):
        return
    assert last.startswith("CORRUPT "), (path, last, proc.stderr[-2000:])
    assert ".arrow" in last, last  # the message names the shard file
