"""A remote lake (moto S3 + node cache) streamed by DataLoader workers under fork and spawn.

Forked workers inherit the parent's filesystem client, whose event loop and connections belong to
the parent: each worker must build its own client, and the parent's client must keep working.
"""

from __future__ import annotations

import numpy as np
import pytest

from m2m import open_lake


@pytest.fixture(scope="module")
def worker_lake(s3_server, tmp_path_factory) -> tuple[str, dict, int]:
    url = f"{s3_server.bucket()}/lake"
    cache = str(tmp_path_factory.mktemp("writer-cache"))
    from m2m import M2MConfig, create_m2m

    from .helpers import DIM, SHARD_BYTES, unit_rows

    cfg = M2MConfig(path=url, latent_dim=DIM, shard_bytes=SHARD_BYTES, cache_dir=cache,
                    storage_options=s3_server.storage_options)
    with create_m2m(cfg) as lake:
        lake.add_splats(unit_rows(3000))
        assert len(lake.manifest.shards) >= 5
    return url, s3_server.storage_options, 3000


@pytest.mark.parametrize("workers,method", [(0, None), (2, "fork"), (2, "spawn")])
def test_remote_lake_streams_an_exact_epoch_with_workers(worker_lake, tmp_path, workers, method) -> None:
    url, options, n = worker_lake
    kwargs = {} if method is None else {"multiprocessing_context": method}
    with open_lake(url, storage_options=options, cache_dir=str(tmp_path / "cache")) as lake:
        # the parent uses its client before the fork (the case that broke: a live client inherited)
        assert lake.snapshot.num_rows == n
        for epoch in range(2):
            dl = lake.export_to_dataloader(batch_size=128, columns=("embedding", "id"), num_workers=workers,
                                           epoch=epoch, timeout=60 if workers else 0, **kwargs)
            ids = np.concatenate([b["id"].numpy() for b in dl])
            assert len(ids) == n and len(np.unique(ids)) == n, (epoch, len(ids))
        assert lake.snapshot.num_rows == n
