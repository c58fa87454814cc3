"""The seed's names run as its README promised: the 10-line training loop and the lake validation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def run_example(name: str, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_m2m_training_loop_cpu():
    out = run_example("m2m_training_loop.py", "--rows", "3000", "--device", "cpu", "--epochs", "2")
    m = re.search(r"trained 2 epoch\(s\) on ([\d,]+) rows \((\d+) batches per epoch\) on cpu", out)
    assert m, out
    assert int(m.group(1).replace(",", "")) == 2 * 3000 and int(m.group(2)) == 12


def test_validate_data_lake(tmp_path):
    out = run_example("validate_data_lake.py", "--rows", "4000", "--dim", "32", "--lake", str(tmp_path / "lake"))
    assert out.count("ok:") == 5 and "all checks passed" in out, out


def test_validate_data_lake_with_workers():
    out = run_example("validate_data_lake.py", "--rows", "3000", "--dim", "16", "--workers", "2")
    assert "all checks passed" in out, out
