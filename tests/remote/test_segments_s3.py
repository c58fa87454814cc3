"""Format 3 (segmented manifests) on a real S3 API server (moto): many writers, rebase, vacuum."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import m2m.lake.manifest as mf
from m2m import M2MConfig, create_m2m, open_lake


@pytest.fixture(autouse=True)
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mf, "SEGMENT_SHARDS", 2)


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def test_writers_racing_on_a_segmented_lake_lose_nothing(s3_server, s3_lake_url) -> None:
    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, storage_options=opts)) as lake:
        for i in range(4):
            lake.add_splats(_rows(5, i), alpha=np.full(5, 1.0))
        assert lake.manifest.format_version == 3
    got: dict[int, list[np.ndarray]] = {w: [] for w in range(3)}
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            with open_lake(s3_lake_url, storage_options=opts) as mine:
                for call in range(3):
                    got[w].append(mine.add_splats(_rows(4, 100 + 10 * w + call),
                                                  alpha=np.full(4, 10.0 * (w + 1) + call)))
        except BaseException as exc:  # noqa: BLE001  (a thread: reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    with open_lake(s3_lake_url, storage_options=opts) as lake:
        s = lake.splats()
        assert len(lake) == 20 + 36 == len(np.unique(s["id"])) and np.all(np.diff(s["id"]) > 0)
        alpha_of = dict(zip(s["id"].tolist(), s["alpha"].tolist()))
        for w, calls in got.items():
            for call, ids in enumerate(calls):
                assert all(alpha_of[i] == 10.0 * (w + 1) + call for i in ids.tolist())
        assert lake.manifest.format_version == 3 and lake.verify() == []
        referenced = {g.path.split("/")[1] for g in lake.manifest.segments or ()}
        lake.vacuum(keep=1, min_age_s=0)
        assert set(lake._fs.listdir(mf.SEGMENT_DIR)) == referenced
    with open_lake(s3_lake_url, storage_options=opts) as lake:
        assert len(lake) == 56


def test_failed_segmented_append_leaves_no_objects_behind(s3_server, s3_lake_url) -> None:
    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, storage_options=opts)) as lake:
        for i in range(3):
            lake.add_splats(_rows(5, i))
        before = (set(lake._fs.listdir("_data")), set(lake._fs.listdir(mf.SEGMENT_DIR)))
        real = type(lake._fs).create_exclusive

        def refuse_versions(self, rel: str, data: bytes) -> bool:
            if rel.startswith(mf.MANIFEST_DIR):
                raise KeyboardInterrupt  # dies after its shards and segment, before its version file
            return real(self, rel, data)

        type(lake._fs).create_exclusive = refuse_versions  # type: ignore[method-assign]
        try:
            with pytest.raises(KeyboardInterrupt):
                lake.add_splats(_rows(5, 9))
        finally:
            type(lake._fs).create_exclusive = real  # type: ignore[method-assign]
        assert (set(lake._fs.listdir("_data")), set(lake._fs.listdir(mf.SEGMENT_DIR))) == before
        assert lake.refresh() == 3 and len(lake) == 15


@pytest.mark.parametrize("operation", ["append", "compact", "estimate_kappa"])
def test_a_vacuum_min_age_0_in_the_commit_window_publishes_nothing_missing(s3_server, s3_lake_url,
                                                                           operation) -> None:
    # observed: a vacuum(keep=1, min_age_s=0) by another handle between a commit's writes and its version
    # put removed the commit's new files (an append's shard, a compaction's segment); the commit still
    # published, and the head was unreadable ("segment ... is missing", "no such object")
    from m2m.errors import CommitConflictError

    opts = s3_server.storage_options
    with create_m2m(M2MConfig(path=s3_lake_url, latent_dim=8, storage_options=opts, knn_k=3)) as lake:
        for i in range(5):
            lake.add_splats(_rows(6, i))
        assert lake.manifest.format_version == 3
        before = (lake.version, lake.splats()["id"].tolist())
        other = open_lake(s3_lake_url, storage_options=opts)
        real, fired = mf.Manifest.to_json, []

        def to_json(self, *args, **kwargs):  # runs inside write_manifest: after the writes, before the put
            if not fired:
                fired.append(other.vacuum(keep=1, min_age_s=0))
            return real(self, *args, **kwargs)

        mf.Manifest.to_json = to_json  # type: ignore[method-assign]
        try:
            with pytest.raises(CommitConflictError, match="was removed before the commit .*nothing was published"):
                {"append": lambda: lake.add_splats(_rows(3, 9)), "compact": lake.compact,
                 "estimate_kappa": lake.estimate_kappa}[operation]()
        finally:
            mf.Manifest.to_json = real  # type: ignore[method-assign]
        assert fired and fired[0]["files_removed"] >= 1
        other.close()
    with open_lake(s3_lake_url, storage_options=opts) as lake:  # the head as it was, every row readable
        assert (lake.version, lake.splats()["id"].tolist()) == before and lake.verify() == []
