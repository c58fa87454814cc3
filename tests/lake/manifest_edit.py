"""Test helpers: edit a lake's manifests the way a person with a text editor (or a buggy writer) would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from m2m.lake.manifest import manifest_checksum


def manifest_path(lake: Path, version: int | None = None) -> Path:
    paths = sorted((Path(lake) / "_manifests").glob("v*.json"))
    if version is None:
        return paths[-1]
    return Path(lake) / "_manifests" / f"v{version:010d}.json"


def edit_manifest(lake: Path, change: Callable[[dict[str, Any]], None], version: int | None = None,
                  rechecksum: bool = True, as_format_1: bool = False) -> Path:
    """Apply ``change`` to a manifest's JSON (still valid JSON). ``rechecksum``: store a checksum that
    matches the edit (a writer bug, not a flipped byte); ``as_format_1``: rewrite it as a format-1
    manifest (no checksum, no total rows), which only the cross-checks can catch."""
    path = manifest_path(lake, version)
    doc = json.loads(path.read_text())
    change(doc)
    if as_format_1:
        doc["format_version"] = 1
        doc.pop("checksum", None)
        doc.pop("rows", None)
    elif rechecksum and doc.get("format_version") == 2:
        doc["checksum"] = manifest_checksum(doc)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    return path
