"""Build a lake, verify it, stream it, and check what a training run relies on.

    python examples/validate_data_lake.py [--rows 20000] [--dim 384] [--lake DIR] [--workers 0]

Checks, each printed as ``ok`` or raising: every committed row reads back (float32 storage, up
to the rounding of the lake's own normalisation); ``verify`` passes; one epoch covers every row exactly once, split over 2 simulated DDP
ranks (with an odd row count one row twice, as DistributedSampler pads the ranks to equal shares); a loader stopped mid-epoch and restored from ``state_dict`` yields exactly the batches not
yet seen; the next epoch is a different order.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from m2m import M2MConfig, create_m2m


def epoch_ids(lake, rank: int, world_size: int, epoch: int, workers: int) -> list[np.ndarray]:
    dl = lake.export_to_dataloader(batch_size=500, columns=("id",), rank=rank, world_size=world_size,
                                   num_workers=workers)
    dl.set_epoch(epoch)
    return [b["id"].numpy() for b in dl]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--lake", default=None, help="lake directory (default: a temporary one)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    args = parser.parse_args(argv)
    tmp = None if args.lake else tempfile.TemporaryDirectory(prefix="m2m-validate-")
    path = args.lake or tmp.name
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    with create_m2m(M2MConfig(path=path, latent_dim=args.dim)) as lake:
        ids = np.concatenate([lake.add_splats(vectors[: args.rows // 2], labels=np.arange(args.rows // 2) % 7),
                              lake.add_splats(vectors[args.rows // 2:], labels=np.arange(args.rows - args.rows // 2) % 7)])
        print(f"built: {len(lake):,} rows x {lake.dim} in {lake.info()['shards']} shards, version {lake.version}")

        back = lake.splats(ids)
        assert np.array_equal(back["id"], ids), "ids differ"
        err = float(np.abs(back["mu"] - vectors).max())   # the lake re-normalises each row in float32
        assert err < 1e-6, f"read-back differs by {err}"
        print(f"ok: every row reads back (max abs difference {err:.1e})")

        lake.verify()
        print("ok: verify")

        seen = [np.concatenate(epoch_ids(lake, r, 2, 0, args.workers)) for r in range(2)]
        assert len(seen[0]) == len(seen[1]), "ranks yield different row counts"
        union = np.concatenate(seen)
        assert set(union.tolist()) == set(ids.tolist()), "an epoch misses rows"
        padded = (-len(ids)) % 2  # as DistributedSampler: the ranks' equal shares repeat that many rows
        assert len(union) == len(ids) + padded, f"{len(union) - len(ids)} rows repeat, padding is {padded}"
        print(f"ok: epoch 0 covers all {len(ids):,} rows over 2 ranks ({len(seen[0]):,} each"
              + (f", {padded} row repeated to make them equal)" if padded else ")"))

        dl = lake.export_to_dataloader(batch_size=500, columns=("id",), num_workers=args.workers)
        full = [b["id"].numpy() for b in dl]
        dl = lake.export_to_dataloader(batch_size=500, columns=("id",), num_workers=args.workers)
        it = iter(dl)
        head = [next(it)["id"].numpy() for _ in range(len(full) // 3)]
        state = dl.state_dict()
        resumed = lake.export_to_dataloader(batch_size=500, columns=("id",), num_workers=args.workers)
        resumed.load_state_dict(state)
        tail = [b["id"].numpy() for b in resumed]
        assert len(head) + len(tail) == len(full), "resume changed the number of batches"
        assert all(np.array_equal(a, b) for a, b in zip(head + tail, full)), "resume changed the batches"
        print(f"ok: resume after {len(head)} of {len(full)} batches yields exactly the rest")

        nxt = [b["id"].numpy() for b in resumed]
        assert not np.array_equal(np.concatenate(nxt), np.concatenate(full)), "epoch 1 repeats epoch 0's order"
        assert np.array_equal(np.sort(np.concatenate(nxt)), np.sort(np.concatenate(full)))
        print("ok: the next epoch is a new order of the same rows")
    if tmp is not None:
        tmp.cleanup()
    print("all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
