"""Helpers of the remote-lake tests: small multi-shard lakes in a moto bucket."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

import m2m
from m2m import M2MConfig

DIM = 32
SHARD_BYTES = 1 << 16   # ~480 rows of float32 x 32 per shard


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@contextlib.contextmanager
def aws_env(endpoint_url: str) -> Iterator[None]:
    """The standard AWS environment variables pointing s3fs at ``endpoint_url`` while the block runs
    (for module-scoped fixtures, which cannot use the function-scoped ``s3_env``)."""
    import s3fs

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": endpoint_url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


def make_lake(url: str, rows: int, cache_dir: str | None = None) -> list[tuple[str, int, int]]:
    """A lake of ``rows`` rows at ``url``; returns its shard files as (path, bytes, crc32)."""
    cfg = M2MConfig(path=url, latent_dim=DIM, shard_bytes=SHARD_BYTES, cache_dir=cache_dir)
    with m2m.create_m2m(cfg) as lake:
        lake.add_splats(unit_rows(rows))
        return [(f.path, f.bytes, f.crc32) for s in lake.manifest.shards for f in s.files]


def dir_bytes(directory: str) -> int:
    """Bytes of the files directly in ``directory`` (cache entries and downloads in flight)."""
    import os

    total = 0
    with os.scandir(directory) as it:
        for e in it:
            try:
                if e.is_file(follow_symlinks=False):
                    total += e.stat().st_size
            except FileNotFoundError:
                pass
    return total


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from the parent ids in /proc/*/stat)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out = [pid]
    i = 0
    while i < len(out):
        out += [c for c, p in parent.items() if p == out[i]]
        i += 1
    return out


def disk_in_use(directory: str, root_pid: int | None = None) -> int:
    """Bytes of disk the node cache in ``directory`` holds: allocated blocks of its files plus those of
    files deleted from it but still open in ``root_pid`` (default: this process) or its descendants."""
    real = os.path.realpath(directory)
    seen: set[tuple[int, int]] = set()
    total = 0
    with os.scandir(real) as it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if e.is_file(follow_symlinks=False) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    for pid in _descendants(os.getpid() if root_pid is None else root_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            link = f"/proc/{pid}/fd/{fd}"
            try:
                target = os.readlink(link)
                if not target.startswith(real + "/"):
                    continue
                st = os.stat(link)  # the open file itself, deleted or not
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


class DiskWatch:
    """Samples `disk_in_use` on a thread; ``peak`` is the most seen."""

    def __init__(self, directory: str, interval: float = 0.002) -> None:
        import threading

        self.directory = directory
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_in_use(self.directory))
            self._stop.wait(self.interval)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.peak = max(self.peak, disk_in_use(self.directory))
