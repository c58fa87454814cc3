"""A real S3 API server for the remote-lake tests: moto in server mode on 127.0.0.1.

`s3_server` (one per test session) is shared and never disturbed; tests that kill or pause a server
use `s3_server_private` (a server process of their own). Clients get their endpoint and credentials
through ``storage_options`` only, so nothing ever reaches real AWS.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

_START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """One moto S3 server process on 127.0.0.1."""

    endpoint_url: str
    process: subprocess.Popen[bytes]
    storage_options: dict[str, Any] = field(default_factory=dict)

    def bucket(self, prefix: str = "m2m") -> str:
        """Create a fresh bucket; returns its ``s3://`` URL (no trailing slash)."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def lake_url(self) -> str:
        """A lake URL in a fresh bucket."""
        return f"{self.bucket()}/lake"

    def pause(self) -> None:
        """SIGSTOP the server: connections are still accepted by the kernel but never answered."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.kill(self.process.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
        except ProcessLookupError:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_s3_server() -> S3Server:
    """Start ``python -m moto.server`` on a free loopback port and wait (bounded) until it answers."""
    port = _free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode} before answering on {url}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                break
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=10)
                raise RuntimeError(f"moto server did not answer on {url} within {_START_TIMEOUT_S} s") from None
            time.sleep(0.1)
    options = {"key": "testing", "secret": "testing", "endpoint_url": url,
               "client_kwargs": {"region_name": "us-east-1"}}
    return S3Server(endpoint_url=url, process=proc, storage_options=options)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The shared moto S3 server of this test session (``.endpoint_url``, ``.storage_options``)."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_server_private() -> Iterator[S3Server]:
    """A moto S3 server for one test only (for tests that kill or pause it)."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_lake_url(s3_server: S3Server) -> str:
    """``s3://<fresh bucket>/lake`` on the shared server."""
    return s3_server.lake_url()


# ---------------------------------------------------------------- node-cache / shard-affinity tests (h9)
@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point s3fs at the shared server through the standard AWS environment variables (this process
    and the subprocesses a test starts); yields the endpoint URL."""
    import s3fs

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_ENDPOINT_URL": s3_server.endpoint_url}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server.endpoint_url
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server: S3Server, s3_env: str) -> str:
    """``s3://<fresh bucket>`` on the shared server, reachable through `s3_env`."""
    return s3_server.bucket()
