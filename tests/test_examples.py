"""The examples run as a user runs them (subprocesses, quick sizes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def run(args: list[str], timeout: float = 240) -> str:
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def example(name: str, *args: str) -> str:
    return run([sys.executable, str(EXAMPLES / name), *args])


def test_quickstart_cpu():
    out = example("quickstart.py", "--rows", "2000", "--device", "cpu")
    m = re.search(r"streamed ([\d,]+) Langevin samples in (\d+) batches "
                  r"\(shapes \[\(256, 640\).* torch.float32 on cpu", out)
    assert m, out
    assert int(m.group(1).replace(",", "")) == 2000 and int(m.group(2)) == 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quickstart_cuda():
    out = example("quickstart.py", "--rows", "2000", "--device", "cuda")
    assert "on cuda" in out


@pytest.mark.parametrize("importance, augment", [
    ("loss", "langevin"),
    pytest.param("kappa", "vmf", marks=pytest.mark.slow),
    pytest.param("none", "none", marks=pytest.mark.slow),
])
def test_train_classifier(importance, augment):
    out = example("train_classifier.py", "--rows", "2000", "--epochs", "2", "--importance", importance,
                  "--augment", augment)
    acc = float(re.search(r"final test accuracy: ([\d.]+)%", out).group(1))
    assert acc > 50.0, out                           # 10 classes: chance is 10%


def test_train_classifier_consolidated():
    out = example("train_classifier.py", "--rows", "2000", "--epochs", "1", "--consolidate", "0.95",
                  "--importance", "alpha", "--augment", "none")
    before, after = (int(v.replace(",", "")) for v in re.search(r"consolidated ([\d,]+) -> ([\d,]+)", out).groups())
    assert 0 < after <= before


@pytest.mark.parametrize("flag", [[], ["--cli"]])
def test_ingest_parquet(flag, tmp_path):
    out = example("ingest_parquet.py", "--rows", "2000", "--out", str(tmp_path), *flag)
    rows = int(re.search(r"wrote ([\d,]+) rows", out).group(1).replace(",", ""))
    assert f"lake: {rows:,} rows x 640 float32" in out
    assert "'type': 'string', 'classes': 10" in out
    assert (tmp_path / "digits.parquet").exists()


@pytest.mark.slow
def test_ddp_train_two_ranks_gloo():
    # `python -m torch.distributed.run` is what the `torchrun` script runs
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / "ddp_train.py"),
               "--rows", "2000", "--epochs", "2"], timeout=400)
    assert "batches per rank [" in out and "world size 2 (gloo)" in out
    counts = re.findall(r"batches per rank \[(\d+), (\d+)\]", out)
    assert counts and all(a == b for a, b in counts)
