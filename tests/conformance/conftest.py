"""Fixtures of the conformance tests: one moto S3 server per session (started only when a remote cell
runs) and the small lakes the cells share (built once per module, on demand)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:  # tests.remote.conftest holds the one moto server launcher
    sys.path.insert(0, ROOT)

from tests.remote.conftest import S3Server, start_s3_server  # noqa: E402


@pytest.fixture(scope="session")
def conformance_s3() -> Iterator[S3Server]:
    """A moto S3 server for the conformance cells (its own, so the remote tests' server stays undisturbed)."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()
