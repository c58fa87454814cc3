"""The manifest fuzz of `test_fuzz` on a format-3 lake (a version file over segment files), edited as an
attacker without the key would: the mutated shard entries re-split into segments, every segment's
SHA-256, size and summary recomputed in the version file, and its checksum too. Every read (the
lake's rows, random access by position and id, ``to_arrow`` and a stream) either raises an `M2MError`
or returns exactly the right data. Until 2026-12-07 reads by position and exports skipped the per-file
cross-checks on format-3 (and remote) lakes: a probing user's 200 such edits gave 24 silent wrong reads.

Not generated: dropping shards. A format-3 version without its last shard (``next_id`` set back) is a
smaller consistent lake no check can tell from a real one; only a signed lake refuses it (docs/format.md).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import m2m.lake.manifest as mf
from m2m import open_lake
from m2m.errors import M2MError
from m2m.lake.manifest import manifest_checksum
from tests.lake import test_fuzz as base

SKIPPED = {"drop shard", "drop shard, rows fixed", "format_version", "dim", "total rows"}
FAST_TRIALS, FAST_SECONDS = 40, 40.0


def _head(lake: Path) -> Path:
    return sorted((lake / "_manifests").glob("v*.json"))[-1]


def _flat(lake: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The head version file and a format-2 style copy of it whose ``shards`` are its segments' entries."""
    doc = json.loads(_head(lake).read_text())
    shards = [s for ref in doc["segments"] for s in json.loads((lake / ref["path"]).read_text())["shards"]]
    flat = {k: v for k, v in doc.items() if k != "segments"} | {"shards": shards}
    return doc, flat


def _publish(lake: Path, doc: dict[str, Any], flat: dict[str, Any]) -> None:
    """Write ``flat``'s shards back into ``doc``'s segments (same files, two shards each), recompute
    every reference and the version file's checksum (an attacker's edit)."""
    shards = flat["shards"]
    refs = doc["segments"]
    template = json.loads((lake / refs[0]["path"]).read_text())  # its format and lake id
    out = {k: v for k, v in flat.items() if k != "shards"}
    new_refs = []
    for j in range(0, len(shards), 2):
        part = shards[j:j + 2]
        path = refs[min(j // 2, len(refs) - 1)]["path"] if j // 2 < len(refs) else f"_manifests/segments/fz{j}.json"
        seg = template | {"shards": part}
        data = json.dumps(seg, sort_keys=True, separators=(",", ":")).encode()
        target = lake / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.chmod(0o644)
        target.write_bytes(data)
        ref = {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "shards": len(part),
               "rows": sum(s["rows"] for s in part), "id_min": part[0]["id_min"], "id_max": part[-1]["id_max"]}
        if "geometry_rows" in refs[0]:
            ref["geometry_rows"] = sum(s["rows"] for s in part if any("neighbors" in f["columns"] for f in s["files"]))
        new_refs.append(ref)
    out["segments"] = new_refs
    out["rows"] = sum(r["rows"] for r in new_refs)
    out.pop("checksum", None)
    out["checksum"] = manifest_checksum(out)
    head = _head(lake)
    head.chmod(0o644)
    head.write_text(json.dumps(out, indent=1, sort_keys=True))


POSITIONS = np.array([0, 3, 39, 40, 41, 79, 80, 100, 129, 130, 140, 149])


def _reads(stream: bool) -> dict[str, Any]:
    """Each read on its own fresh handle, so that no read is checked by another one first."""
    def arrow(lake: Any) -> Any:
        table = lake.to_arrow()
        return (table.column("id").to_numpy(), table.column("label").to_pylist(), table.column("score").to_numpy())

    def streamed(lake: Any) -> Any:
        batches = list(lake.export_to_dataloader(batch_size=37, shuffle=False, columns=("id", "embedding", "label")))
        return tuple(np.concatenate([b[k].numpy() for b in batches]) for k in ("id", "embedding", "label"))

    reads = {"by_position": lambda lake: (lake[POSITIONS]["id"].copy(), list(lake[POSITIONS]["label"])),
             "by_id": lambda lake: lake.take(WANT_IDS[POSITIONS])["mu"].copy(),
             "arrow": arrow}
    if stream:
        reads["stream"] = streamed
    return reads


WANT_IDS = np.zeros(0, dtype=np.int64)


def read_all(path: Path, stream: bool) -> dict[str, Any]:
    """Every read's result, or "error" where it raised an `M2MError`."""
    out: dict[str, Any] = {}
    try:
        out["whole"] = base.read_everything(path, stream=False)
    except M2MError:
        out["whole"] = "error"
    for name, read in _reads(stream).items():
        try:
            with open_lake(path) as lake:
                out[name] = read(lake)
        except M2MError:
            out[name] = "error"
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, list):
        return a == b
    return base.same(a, b)


def check(got: dict[str, Any], want: dict[str, Any], what: str) -> int:
    """Assert every read that did not raise returned the reference data; returns how many raised."""
    errors = 0
    for name, value in got.items():
        if isinstance(value, str) and value == "error":
            errors += 1
        elif name == "whole":
            base.assert_exact(value, want["whole"], what)
        else:
            assert _equal(value, want[name]), f"SILENT WRONG DATA from {name} after {what}"
    return errors


def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeds: range, budget_s: float) -> dict[str, int]:
    monkeypatch.setattr(mf, "SEGMENT_SHARDS", 2)
    pristine, other = tmp_path / "pristine", tmp_path / "other"
    base.build(pristine)
    base.build(other, seed=6)
    docs = [json.loads(p.read_text()) for p in sorted((pristine / "_manifests").glob("v*.json"))]
    assert docs[-1]["format_version"] == 3 and len(docs[-1]["segments"]) == 2
    first = next(d for d in docs if d["operation"]["type"] == "estimate_kappa")
    first_shards = first.get("shards") or [s for ref in first["segments"]
                                           for s in json.loads((pristine / ref["path"]).read_text())["shards"]]
    base.STALE.clear()
    base.STALE.update({i: s["files"][-1] for i, s in enumerate(first_shards)})
    base.FOREIGN[:] = _flat(other)[1]["shards"]
    for p in (other / "_data").glob("*.arrow"):
        shutil.copyfile(p, pristine / "_data" / p.name)
    global WANT_IDS
    with open_lake(pristine) as lake:
        WANT_IDS = lake.snapshot.ids().copy()  # (by_id reads these ids)
    want = read_all(pristine, stream=True)
    assert all(not isinstance(v, str) for v in want.values()), want
    stats = {"error": 0, "correct": 0, "skipped": 0}
    t0 = time.monotonic()
    for seed in seeds:
        if time.monotonic() - t0 > budget_s:
            break
        rnd = random.Random(seed)
        name, change = rnd.choice([m for m in base.manifest_mutations(rnd) if m[0] not in SKIPPED])
        lake = tmp_path / f"t{seed}"
        shutil.copytree(pristine, lake)
        doc, flat = _flat(lake)
        try:
            change(flat)
            if not flat["shards"]:
                raise IndexError
            _publish(lake, doc, flat)
        except (IndexError, ValueError, KeyError, TypeError, AttributeError):
            stats["skipped"] += 1
            shutil.rmtree(lake)
            continue
        what = f"seed {seed}: {name} (segments rehashed)"
        try:
            with base.deadline(base.TRIAL_TIMEOUT_S):
                got = read_all(lake, stream=rnd.random() < 0.5)
        except Exception as exc:  # noqa: BLE001 - a raw exception is a finding, reported with its seed
            raise AssertionError(f"{what}: raw {type(exc).__name__}: {exc}") from exc
        stats["error" if check(got, want, what) else "correct"] += 1
        shutil.rmtree(lake)
    return stats


def test_fuzz_segments_rehashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stats = run(tmp_path, monkeypatch, range(FAST_TRIALS), FAST_SECONDS)
    assert stats["error"] >= 10, stats


@pytest.mark.slow
def test_fuzz_segments_rehashed_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stats = run(tmp_path, monkeypatch, range(1000, 1300), 400.0)
    assert stats["error"] >= 100, stats
