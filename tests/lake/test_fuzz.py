"""Issue 11 acceptance: mutate manifests (valid JSON, wrong numbers) and shard bytes; every read either
raises an `M2MError` or returns exactly the right data — never silent wrong data, never a raw
exception, never a file outside the lake, never a hang.

Seeded loops: the default run does `FAST_TRIALS` trials (a few seconds); ``-m slow`` runs
`SLOW_TRIALS` more. Each failure prints the seed and the mutation, so it replays alone.

Mutations of the newest manifest are applied three ways: keeping the stored checksum (a flipped
or hand-edited number: the checksum must catch it), with a recomputed checksum (a writer bug: the
cross-checks against the files must catch it), and rewritten as a format-1 manifest (no checksum,
no total rows: an old lake). Dropping a whole shard from a format-1 manifest is not generated: it
describes a smaller but consistent lake that no check can tell from a real one (format 2's total
rows and checksum catch it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m, open_lake
from m2m.errors import M2MError
from m2m.lake.manifest import manifest_checksum

D = 4
FAST_TRIALS = 60
FAST_SECONDS = 40.0
SLOW_TRIALS = 600
TRIAL_TIMEOUT_S = 60


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging) when the body runs past ``seconds``."""
    def boom(*_: Any) -> None:
        raise TimeoutError(f"trial ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def build(path: Path, seed: int = 5) -> None:
    g = np.random.default_rng(seed)
    names = np.array(["ant", "bee", "cow"])
    with create_m2m(M2MConfig(path=path, latent_dim=D, knn_k=3)) as lake:
        for rows in (40, 40, 50):
            lake.add_splats(g.standard_normal((rows, D)), labels=names[g.integers(0, 3, rows)],
                            metadata={"score": g.random(rows), "tag": np.array([f"t{i}" for i in range(rows)])})
        lake.estimate_kappa(threads=1)
        lake.estimate_kappa(threads=1)   # the first run's sidecars stay on disk: stale ones to swap in
        lake.add_splats(g.standard_normal((20, D)), labels=names[g.integers(0, 3, 20)],
                        metadata={"score": g.random(20), "tag": np.array([f"u{i}" for i in range(20)])})


def read_everything(path: Path, stream: bool) -> dict[str, Any]:
    with open_lake(path) as lake:
        out: dict[str, Any] = dict(lake.splats())
        snap = lake.snapshot
        out["label_codes"] = snap.read_all("label").copy()
        for s, shard in enumerate(lake.manifest.shards):
            if any("neighbors" in f.columns for f in shard.files):
                out[f"neighbors{s}"] = snap.column(s, "neighbors").copy()
                out[f"neighbor_cos{s}"] = snap.column(s, "neighbor_cos").copy()
        out["problems"] = lake.verify()
        if stream:
            parts: dict[str, list[np.ndarray]] = {"id": [], "embedding": [], "kappa": [], "label": []}
            for batch in lake.export_to_dataloader(batch_size=37, shuffle=False, columns=tuple(parts)):
                for k in parts:
                    parts[k].append(batch[k].numpy())
            out["stream"] = {k: np.concatenate(v) for k, v in parts.items()}
    return out


def same(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def assert_exact(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    keys = set(want) - {"problems", "stream"}
    assert set(got) - {"problems", "stream"} == keys, f"{what}: columns {sorted(got)} != {sorted(want)}"
    for k in keys:
        assert same(got[k], want[k]), f"SILENT WRONG DATA in {k!r} after {what}"
    if "stream" in got:
        s = got["stream"]
        assert same(s["id"], want["id"]), f"SILENT WRONG DATA in the stream's ids after {what}"
        assert np.array_equal(s["embedding"], want["mu"].astype(np.float32)), f"stream embeddings after {what}"
        # (the lake's last 20 rows have no estimate: the stream computes the geometry in memory, from mu)
        assert np.array_equal(s["kappa"], want["stream"]["kappa"]), f"stream kappa after {what}"
        assert same(s["label"], want["stream"]["label"]), f"SILENT WRONG DATA in the stream's label codes after {what}"


# ----------------------------------------------------------------------------- mutations
Doc = dict[str, Any]


def _pick_file(doc: Doc, rnd: random.Random) -> dict[str, Any]:
    shard = rnd.choice(doc["shards"])
    return rnd.choice(shard["files"])


def _delta(rnd: random.Random, scale: int) -> int:
    return rnd.choice([-1, 1, -scale, scale, rnd.randint(-3 * scale, 3 * scale) or 1])


def _stale_sidecar(doc: Doc, rnd: random.Random) -> None:
    """A sidecar entry of the first estimate_kappa run (an older version) in place of the current one."""
    i = rnd.choice([i for i, s in enumerate(doc["shards"]) if len(s["files"]) > 1])
    doc["shards"][i]["files"][-1] = STALE[i]


def _swap_sidecars_without_ids(doc: Doc, rnd: random.Random) -> None:
    a, b = rnd.sample([i for i, s in enumerate(doc["shards"]) if len(s["files"]) > 1], 2)
    fa, fb = doc["shards"][a]["files"], doc["shards"][b]["files"]
    for f in (fa[-1], fb[-1]):
        f["columns"] = [c for c in f["columns"] if c != "id"]
    fa[-1], fb[-1] = fb[-1], fa[-1]


def _drop_shard_fixed(doc: Doc, rnd: random.Random) -> None:
    gone = doc["shards"].pop(rnd.randrange(len(doc["shards"])))
    doc["rows"] -= gone["rows"]
    if doc.get("geometry") and any("neighbors" in f["columns"] for f in gone["files"]):
        doc["geometry"]["rows"] -= gone["rows"]


def _foreign_shard(doc: Doc, rnd: random.Random) -> None:
    """The entry of the same shard of another lake built the same way (its file is copied in)."""
    i = rnd.randrange(len(doc["shards"]))
    j = rnd.randrange(len(doc["shards"][i]["files"]))
    doc["shards"][i]["files"][j] = FOREIGN[i]["files"][j]


STALE: dict[int, Any] = {}      # shard -> sidecar entry of the first estimate (filled by run_trials)
FOREIGN: list[Any] = []         # shards of the other lake (same shapes, other lake id and data)


def manifest_mutations(rnd: random.Random) -> list[tuple[str, Callable[[Doc], None]]]:
    def shard(doc: Doc) -> dict[str, Any]:
        return rnd.choice(doc["shards"])

    def other_path(doc: Doc) -> str:
        return rnd.choice([f["path"] for s in doc["shards"] for f in s["files"]])

    def swap_entries(doc: Doc, sidecar: bool) -> None:
        a, b = rnd.sample(range(len(doc["shards"])), 2)
        fa, fb = doc["shards"][a]["files"], doc["shards"][b]["files"]
        i = -1 if sidecar else 0
        fa[i], fb[i] = fb[i], fa[i]

    return [
        ("shard rows", lambda d: shard(d).update(rows=max(0, shard(d)["rows"] + _delta(rnd, 10)))),
        ("id_min", lambda d: (s := shard(d)).update(id_min=max(0, s["id_min"] + _delta(rnd, 5)))),
        ("id_max", lambda d: (s := shard(d)).update(id_max=max(0, s["id_max"] + _delta(rnd, 5)))),
        ("shift a shard's ids", lambda d: (s := shard(d), k := _delta(rnd, 3),
                                           s.update(id_min=max(0, s["id_min"] + k), id_max=max(0, s["id_max"] + k)))),
        ("next_id", lambda d: d.update(next_id=rnd.randint(0, 2 * d["next_id"]))),
        ("file bytes", lambda d: (f := _pick_file(d, rnd)).update(bytes=max(0, f["bytes"] + _delta(rnd, 64)))),
        ("file crc32", lambda d: _pick_file(d, rnd).update(crc32=rnd.randrange(1 << 32))),
        ("dim", lambda d: d.update(dim=d["dim"] + rnd.choice([-1, 1, 4]))),
        ("dtype", lambda d: d.update(dtype="float16")),
        ("path to another file", lambda d: _pick_file(d, rnd).update(path=other_path(d))),
        ("path to a missing file", lambda d: _pick_file(d, rnd).update(path=f"_data/{rnd.randrange(1 << 60):x}.arrow")),
        ("path escapes", lambda d: _pick_file(d, rnd).update(path=rnd.choice(
            ["_data/../../../ESCAPED.arrow", "../../ESCAPED.arrow", "/tmp/ESCAPED.arrow", "_data/x/../../ESCAPED"]))),
        ("swap shards", lambda d: (i := rnd.randrange(len(d["shards"]) - 1),
                                   d["shards"].__setitem__(slice(i, i + 2), d["shards"][i:i + 2][::-1]))),
        ("drop shard", lambda d: d["shards"].pop(rnd.randrange(len(d["shards"])))),
        ("duplicate shard", lambda d: d["shards"].insert(rnd.randrange(len(d["shards"])), shard(d))),
        ("drop sidecar", lambda d: rnd.choice([s for s in d["shards"] if len(s["files"]) > 1])["files"].pop()),
        ("duplicate file entry", lambda d: (s := shard(d))["files"].append(s["files"][0])),
        ("swap main files", lambda d: swap_entries(d, False)),
        ("swap sidecars", lambda d: swap_entries(d, True)),
        ("drop a column name", lambda d: (f := _pick_file(d, rnd))["columns"].remove(rnd.choice(f["columns"]))),
        ("add a column name", lambda d: (f := _pick_file(d, rnd))["columns"].append(
            rnd.choice([c for c in ("id", "mu", "kappa", "alpha", "label", "score", "tag", "neighbors",
                                    "neighbor_cos") if c not in f["columns"]] or ["zzz"]))),
        ("label_type", lambda d: d.update(label_type=rnd.choice([None, "int64"]))),
        ("vocabulary", lambda d: d.update(label_vocabulary=rnd.choice(
            [d["label_vocabulary"][:-1], d["label_vocabulary"][::-1], d["label_vocabulary"] + ["zebra"]]))),
        ("metadata type", lambda d: d["metadata"].update(score=rnd.choice(["float", "int64", "string"]))),
        ("drop metadata", lambda d: d["metadata"].pop("tag")),
        ("geometry k", lambda d: d["geometry"].update(k=d["geometry"]["k"] + rnd.choice([-1, 1]))),
        ("geometry rows", lambda d: d["geometry"].update(rows=d["geometry"]["rows"] + _delta(rnd, 10))),
        ("no geometry", lambda d: d.update(geometry=None)),
        ("total rows", lambda d: d.update(rows=d["rows"] + _delta(rnd, 10))),
        ("format_version", lambda d: d.update(format_version=rnd.choice([0, 3, "2", 2.0]))),
        ("version", lambda d: d.update(version=rnd.choice([-1, "x", d["version"] + 1]))),
        ("parent", lambda d: d.update(parent=d["version"] + 1)),
        # issue 18 item 1 (applied with the checksum recomputed too)
        ("reverse vocabulary", lambda d: d["label_vocabulary"].reverse()),
        ("stale sidecar", lambda d: _stale_sidecar(d, rnd)),
        ("swap sidecars without ids", lambda d: _swap_sidecars_without_ids(d, rnd)),
        ("drop shard, rows fixed", lambda d: _drop_shard_fixed(d, rnd)),
        ("foreign shard", lambda d: _foreign_shard(d, rnd)),
        ("kappa count inflated", lambda d: d["stats"]["kappa"].update(count=d["rows"])),
        ("stats kappa not a number", lambda d: d["stats"]["kappa"].update(count=rnd.choice(["x", [1], None]))),
        ("lake_id removed", lambda d: d.pop("lake_id")),
        ("lake_id changed", lambda d: d.update(lake_id=f"{rnd.randrange(1 << 128):032x}")),
        ("harmless: created", lambda d: d.update(created=rnd.random())),
        ("harmless: next_id up", lambda d: d.update(next_id=d["next_id"] + rnd.randint(1, 1000))),
        ("harmless: operation", lambda d: d.update(operation={"type": "fuzz"})),
    ]


def byte_mutations(rnd: random.Random, lake: Path) -> list[tuple[str, Callable[[], None]]]:
    files = sorted((lake / "_data").glob("*.arrow"))

    def flip() -> None:
        f = rnd.choice(files)
        data = bytearray(f.read_bytes())
        i = rnd.randrange(len(data))
        data[i] ^= 1 << rnd.randrange(8)
        f.write_bytes(bytes(data))

    def truncate() -> None:
        f = rnd.choice(files)
        data = f.read_bytes()
        f.write_bytes(data[: rnd.randrange(len(data))])

    def append() -> None:
        f = rnd.choice(files)
        f.write_bytes(f.read_bytes() + os.urandom(rnd.randint(1, 64)))

    def replace() -> None:
        a, b = rnd.sample(files, 2)
        shutil.copyfile(a, b)

    def delete() -> None:
        rnd.choice(files).unlink()

    def manifest_flip() -> None:
        m = sorted((lake / "_manifests").glob("v*.json"))[-1]
        data = bytearray(m.read_bytes())
        i = rnd.randrange(len(data))
        data[i] = rnd.choice(b"0123456789,:{}[]\" xe-")
        m.write_bytes(bytes(data))

    def foreign() -> None:  # a shard file of another lake copied over one of ours
        names = sorted(p.name for p in (lake.parent.parent.parent.parent / "other" / "_data").glob("*.arrow"))
        src = lake.parent.parent.parent.parent / "other" / "_data" / rnd.choice(names)
        shutil.copyfile(src, rnd.choice(files))

    return [("copy another lake's shard over one", foreign), ("flip a shard bit", flip), ("truncate a shard", truncate), ("append to a shard", append),
            ("replace a shard by another", replace), ("delete a shard", delete), ("flip a manifest byte", manifest_flip)]


def outside_files(root: Path, lake: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if lake not in p.parents and p != lake}


def run_trials(tmp_path: Path, seeds: range, budget_s: float) -> dict[str, int]:
    pristine = tmp_path / "pristine"
    build(pristine)
    other = tmp_path / "other"
    build(other, seed=6)
    docs = [json.loads(p.read_text()) for p in sorted((pristine / "_manifests").glob("v*.json"))]
    first = next(d for d in docs if d["operation"]["type"] == "estimate_kappa")
    STALE.clear()
    STALE.update({i: s["files"][-1] for i, s in enumerate(first["shards"])})
    FOREIGN[:] = json.loads(sorted((other / "_manifests").glob("v*.json"))[-1].read_text())["shards"]
    for p in (other / "_data").glob("*.arrow"):
        shutil.copyfile(p, pristine / "_data" / p.name)   # the foreign files are present, only unreferenced
    want = read_everything(pristine, stream=True)
    assert want["problems"] == []
    stats = {"error": 0, "correct": 0, "skipped": 0}
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()
    for seed in seeds:
        if time.monotonic() - t0 > budget_s:
            break
        rnd = random.Random(seed)
        root = tmp_path / f"t{seed}"
        lake = root / "a" / "b" / "lake"
        shutil.copytree(pristine, lake)
        before = outside_files(root, lake)
        if rnd.random() < 0.75:
            name, change = rnd.choice(manifest_mutations(rnd))
            way = rnd.choice(["stored checksum", "recomputed checksum", "format 1"])
            if way == "format 1" and name == "drop shard":
                way = "recomputed checksum"
            m = sorted((lake / "_manifests").glob("v*.json"))[-1]
            doc = json.loads(m.read_text())
            try:
                change(doc)
            except (IndexError, ValueError, KeyError, TypeError, AttributeError):
                shutil.rmtree(root)
                stats["skipped"] += 1
                continue  # not applicable to this manifest
            if way == "format 1":
                doc["format_version"] = 1
                doc.pop("checksum", None)
                doc.pop("rows", None)
            elif way == "recomputed checksum":
                doc["checksum"] = manifest_checksum(doc)
            m.write_text(json.dumps(doc))
            what = f"seed {seed}: {name} ({way})"
        else:
            name, act = rnd.choice(byte_mutations(rnd, lake))
            act()
            what = f"seed {seed}: {name}"
        try:
            with deadline(TRIAL_TIMEOUT_S):
                got = read_everything(lake, stream=rnd.random() < 0.3)
        except M2MError:
            stats["error"] += 1
            outcomes[f"{name}: error"] = outcomes.get(f"{name}: error", 0) + 1
        except Exception as exc:  # noqa: BLE001 - a raw exception is a finding, reported with its seed
            raise AssertionError(f"{what}: raw {type(exc).__name__}: {exc}") from exc
        else:
            outcome = "verify reports it" if got["problems"] else "correct data"
            stats["error" if got["problems"] else "correct"] += 1  # what was read must be right either way
            outcomes[f"{name}: {outcome}"] = outcomes.get(f"{name}: {outcome}", 0) + 1
            assert_exact(got, want, what)
        assert outside_files(root, lake) == before, f"{what}: a file appeared outside the lake"
        assert not list(tmp_path.rglob("ESCAPED*")), what
        shutil.rmtree(root)
    stats["outcomes"] = outcomes  # type: ignore[assignment]
    return stats


def test_fuzz_manifests_and_shard_bytes(tmp_path: Path) -> None:
    stats = run_trials(tmp_path, range(FAST_TRIALS), FAST_SECONDS)
    assert stats["error"] >= 10 and stats["correct"] >= 1, stats   # both outcomes were exercised


@pytest.mark.slow
def test_fuzz_manifests_and_shard_bytes_long(tmp_path: Path) -> None:
    stats = run_trials(tmp_path, range(1000, 1000 + SLOW_TRIALS), 600.0)
    assert stats["error"] >= 100, stats
