"""Helpers of the remote-lake tests: small multi-shard lakes in a moto bucket."""

from __future__ import annotations

import numpy as np

import m2m
from m2m import M2MConfig

DIM = 32
SHARD_BYTES = 1 << 16   # ~480 rows of float32 x 32 per shard


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


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
