"""Whole-file CRC32, shared by the shard writer/verifier and the node cache (which must not import shard.py)."""

from __future__ import annotations

import zlib

_CHUNK = 8 << 20


def file_crc32(path: str) -> int:
    """CRC32 of a whole file, read in large chunks."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                return crc
            crc = zlib.crc32(buf, crc)
