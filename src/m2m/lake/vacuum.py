"""`Lake.vacuum` on a local lake: delete old versions and unreferenced files, and nothing else.

Only regular files whose names m2m itself writes are deleted (`is_data_name`, `is_manifest_temp`):
shard files ``<32 hex>.arrow`` (and ``.tmp-<32 hex>.arrow`` being written) in ``_data/``, old manifests ``v<10 digits>.json`` and interrupted
manifest writes ``.tmp-<32 hex>`` in ``_manifests/``, manifest segments ``<32 hex>.json`` no kept
version references (and interrupted writes) in ``_segments/``. A README, notes, a subfolder, a symlink or a
FIFO placed there survives. Entries are examined and removed relative to a descriptor of the
folder opened without following links (``O_NOFOLLOW``), so nothing is deleted through a symlink,
even one swapped in while vacuum runs. ``_data`` or ``_manifests`` being a symlink itself (a lake
whose data lives elsewhere) is refused with one line unless ``allow_symlinked_dirs`` is given;
then the real folder's m2m-named regular files are the only ones touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Iterator

from m2m.errors import ConfigError
from m2m.lake.fs import LakeFS
from m2m.lake.manifest import DATA_DIR, MANIFEST_DIR, SEGMENT_DIR, list_versions, manifest_name, read_manifest

_DATA_NAME = re.compile(r"(\.tmp-)?[0-9a-f]{32}\.arrow")
_SEGMENT_NAME = re.compile(r"[0-9a-f]{32}\.json")
_MANIFEST_TEMP = re.compile(r"\.tmp-[0-9a-f]{32}")


def is_data_name(name: str) -> bool:
    """Whether ``name`` is a shard file name m2m writes (``<32 hex>.arrow``, or ``.tmp-`` before it while written)."""
    return _DATA_NAME.fullmatch(name) is not None


def is_segment_name(name: str) -> bool:
    """Whether ``name`` is a manifest segment file name m2m writes (``<32 hex>.json``)."""
    return _SEGMENT_NAME.fullmatch(name) is not None


def is_manifest_temp(name: str) -> bool:
    """Whether ``name`` is an interrupted manifest write (``.tmp-<32 hex>``)."""
    return _MANIFEST_TEMP.fullmatch(name) is not None


@contextlib.contextmanager
def _dir_fd(fs: LakeFS, rel: str, allow_symlinked_dirs: bool) -> Iterator[int | None]:
    """A descriptor of the lake folder ``rel`` (None when it does not exist)."""
    path = fs.local_path(rel)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        yield None
        return
    if stat.S_ISLNK(st.st_mode):
        if not allow_symlinked_dirs:
            raise ConfigError(f"vacuum refused: {path} is a symlink (to {os.path.realpath(path)}); pass "
                              "allow_symlinked_dirs=True (m2m vacuum --allow-symlinked-dirs) to vacuum its target")
        flags = os.O_RDONLY | os.O_DIRECTORY
    else:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def _remove_regular(fd: int, name: str, before: float | None = None) -> bool:
    """Unlink ``name`` in the folder ``fd`` if it is a regular file (never following a link) last
    modified before the time ``before`` (any time when None)."""
    try:
        st = os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or (before is not None and st.st_mtime >= before):
        return False
    os.unlink(name, dir_fd=fd)
    return True


def vacuum_local(fs: LakeFS, keep: int, allow_symlinked_dirs: bool = False, min_age_s: float = 0.0) -> dict[str, int]:
    """Delete all but the last ``keep`` versions and the m2m files none of them references that are
    at least ``min_age_s`` seconds old (a compaction or a Ray write in flight writes its files before
    it takes the lock to publish them; the caller holds the write lock)."""
    before = time.time() - min_age_s if min_age_s > 0 else None
    # every folder opened (and a symlinked one refused) before anything is deleted: `_segments` opened
    # after the deletes refused the vacuum once it had removed the old versions and their files (2026-12-08)
    with _dir_fd(fs, MANIFEST_DIR, allow_symlinked_dirs) as mfd, _dir_fd(fs, DATA_DIR, allow_symlinked_dirs) as dfd, \
            _dir_fd(fs, SEGMENT_DIR, allow_symlinked_dirs) as sfd:
        versions = list_versions(fs)
        kept = versions[-keep:]
        live: set[str] = set()
        live_segments: set[str] = set()
        for v in kept:
            m = read_manifest(fs, v)
            live.update(f.path.rsplit("/", 1)[-1] for f in m.files())
            if m.format_version >= 3:
                live_segments.update(g.path.rsplit("/", 1)[-1] for g in m.segments or ())
        removed_versions = 0
        if mfd is not None:
            for v in versions[:-keep]:
                removed_versions += _remove_regular(mfd, manifest_name(v).rsplit("/", 1)[-1])
            for name in os.listdir(mfd):
                if is_manifest_temp(name):
                    _remove_regular(mfd, name, before)
        removed_files = 0
        if dfd is not None:
            for name in sorted(os.listdir(dfd)):
                if is_data_name(name) and name not in live:
                    removed_files += _remove_regular(dfd, name, before)
        if sfd is not None:
            for name in sorted(os.listdir(sfd)):
                if (is_segment_name(name) and name not in live_segments) or is_manifest_temp(name):
                    removed_files += _remove_regular(sfd, name, before)
    return {"versions_removed": removed_versions, "files_removed": removed_files}
