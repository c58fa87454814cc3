"""Fault injection: a shard cut short the moment a read path opens it gives `CorruptShardError`
naming the file, never a signal (issue 18 item 2).

Each path runs in a child process (`truncate_victim.py`) that truncates every shard file to half
its size right after it is opened or memory-mapped. m2m 43de0e0 memory-mapped shards in the
footer check, `column_extents`, `verify`, export, `to_arrow` and `Snapshot` reads; with a cut after
every open its ``open_lake`` died with SIGBUS (-7). Paths beyond the five fast ones are slow tests.
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


@pytest.mark.parametrize("path,how", CASES)
def test_a_shard_cut_when_opened_is_corrupt_shard_error_not_a_signal(template, tmp_path, path, how):
    # how="open": cut after every open (every path must then fail cleanly); how="map": cut only
    # right after a memory map (what killed m2m 43de0e0; nothing maps now, so the data reads whole)
    lake = str(tmp_path / "lake")
    shutil.copytree(template, lake)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("M2M_TEST_CUT_DIR", None)
    env["M2M_TEST_CUT_DIR_ON"] = how
    proc = subprocess.run([sys.executable, VICTIM, lake, path], check=False, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode >= 0, f"{path}: killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, f"{path}: exit {proc.returncode}: {proc.stderr[-2000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    if how == "map" and last.startswith("OK"):
        return
    assert last.startswith("CORRUPT "), (path, last, proc.stderr[-2000:])
    assert ".arrow" in last, last  # the message names the shard file
