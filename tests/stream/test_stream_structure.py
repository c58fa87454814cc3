"""Issue 17's structural acceptance: one pipeline builder, a small loader, and mypy-clean stream code."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
STREAM = SRC / "m2m" / "stream"


def test_stages_are_assembled_only_in_the_pipeline_builder():
    for name in ("HotStage(", "Prefetcher(", "ResidentStage(", "BatchStage(", "WarmStage(", "ColdStage("):
        users = sorted(str(p.relative_to(SRC)) for p in (SRC / "m2m").rglob("*.py")
                       if re.search(rf"(?<![\w.])({re.escape(name)})", _code(p)) and not p.match("stages/*.py"))
        assert users == ["m2m/stream/pipeline.py"], (name, users)


def _code(path: Path) -> str:
    """The source without class definitions' own names (``class HotStage(Stage)``)."""
    return re.sub(r"class \w+\(", "", path.read_text())


def test_the_loader_is_small():
    from m2m.stream.loader import StreamLoader

    params = [p for p in inspect.signature(StreamLoader.__init__).parameters if p != "self"]
    assert len(params) <= 12, params
    assert len((STREAM / "loader.py").read_text().splitlines()) <= 300


def test_the_stream_does_not_probe_its_source_with_getattr():
    for path in STREAM.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"getattr\((self\.)?(_?ds\.|dataset\.|r\.|self\.)?source\b", text), path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mypy_passes_on_the_stream_package():
    if shutil.which("mypy") is None:
        pytest.skip("mypy is not installed")
    proc = subprocess.run([sys.executable, "-m", "mypy", str(STREAM)], capture_output=True, text=True,
                          cwd=str(SRC.parent), timeout=850)
    assert proc.returncode == 0, proc.stdout[-4000:]
