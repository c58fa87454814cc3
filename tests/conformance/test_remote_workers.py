"""Issue 17 acceptance: a remote lake (moto S3, node cache) streamed with ``num_workers=2`` under the
default start method (fork on Linux) gives exact epochs, never a hang (DataLoader ``timeout``), and no
permanent error retried as a store failure; ``spawn`` is the control."""

from __future__ import annotations

import numpy as np
import pytest

from m2m import M2MConfig, create_m2m, open_lake

N, D = 3000, 16


@pytest.fixture(scope="module")
def remote_lake(conformance_s3, tmp_path_factory):
    url = f"{conformance_s3.bucket('workers')}/lake"
    opts = conformance_s3.storage_options
    with create_m2m(M2MConfig(path=url, latent_dim=D, storage_options=opts)) as lake:
        for part in range(3):  # three commits: three shards
            x = np.random.default_rng(part).standard_normal((N // 3, D)).astype(np.float32)
            lake.add_splats(x)
        ids = set(lake.snapshot.ids().tolist())
    return url, opts, str(tmp_path_factory.mktemp("node-cache")), ids


@pytest.mark.timeout(300)
@pytest.mark.parametrize("context, shuffle_mode", [
    pytest.param(None, "full", id="default-fork-full"),
    pytest.param(None, "block", id="default-fork-block"),
    pytest.param("spawn", "full", id="spawn-full"),
])
def test_remote_lake_with_two_workers_streams_exact_epochs(remote_lake, context, shuffle_mode):
    url, opts, cache_dir, ids = remote_lake
    with open_lake(url, storage_options=opts, cache_dir=cache_dir) as lake:
        kw = {} if context is None else {"multiprocessing_context": context}
        dl = lake.export_to_dataloader(batch_size=128, columns=("id", "embedding"), num_workers=2, timeout=60,
                                       shuffle_mode=shuffle_mode, **kw)
        epochs = []
        for _ in range(2):
            got = np.concatenate([b["id"].numpy() for b in dl])
            assert len(got) == N and set(got.tolist()) == ids, "not every row exactly once"
            epochs.append(got)
        assert not np.array_equal(epochs[0], epochs[1])
        dl.close()
