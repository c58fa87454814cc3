"""Whole-file CRC32 and SHA-256, shared by the shard writer/verifier and the node cache (which must not
import shard.py)."""

from __future__ import annotations

import hashlib
import os
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


def fd_sha256(fd: int, size_hint: int = _CHUNK) -> tuple[int, str]:
    """``(bytes read, hex SHA-256)`` of the whole open file ``fd``, read positionally (the descriptor's
    offset is left alone) through a buffer of at most ``size_hint`` bytes."""
    h = hashlib.sha256()
    view = memoryview(bytearray(max(1, min(_CHUNK, size_hint))))
    at = 0
    while True:
        got = os.preadv(fd, [view], at)
        if got == 0:
            return at, h.hexdigest()
        h.update(view[:got])
        at += got
