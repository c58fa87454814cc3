"""Every ```python block of the README and of the docs pages that hold runnable snippets runs as written
(in a fresh interpreter, in a scratch folder).

A block may need names from an earlier block of the same section; the README keeps each block
self-contained instead, so a reader can paste any one of them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + [ROOT / "docs" / name for name in ("object-stores.md", "ray.md", "cli.md", "lake.md")]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(pages: list[Path] = PAGES) -> list[tuple[str, str]]:
    out = []
    for page in pages:
        text = page.read_text()
        out += [(f"{page.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}", m.group(1))
                for m in BLOCK.finditer(text)]
    return out


def test_the_readme_has_python_blocks():
    assert len(python_blocks([README])) >= 2


@pytest.mark.parametrize("line, code", python_blocks(), ids=lambda v: v if ":" in v and "\n" not in v else "")
def test_readme_block_runs(line, code, tmp_path):
    if re.search(r"^import ray", code, re.M):  # the optional extra (pip install m2m[ray])
        pytest.importorskip("ray")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"block at {line} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
