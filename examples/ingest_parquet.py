"""Ingest embeddings from a Parquet file into a lake, then stream them.

    python examples/ingest_parquet.py [--rows 10000] [--out DIR] [--cli]

Writes digits embeddings (seed protocol) to ``DIR/digits.parquet`` with an ``embedding`` column
(fixed_size_list<float32>[640]), a string ``digit`` label and an int ``image`` column, as an
embedding pipeline would. The file is then read in record batches and appended as ONE atomic
commit with `Lake.add_splat_chunks` (labels and the ``image`` metadata column included); with
``--cli`` it is ingested by the command line instead:

    m2m ingest DIR/digits.parquet --lake DIR/lake --label-column digit
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from m2m_bench.datasets import digits_embeddings

from m2m import M2MConfig, create_m2m, open_lake

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"], dtype=object)


def write_parquet(path: str, rows: int, seed: int) -> int:
    """Write the training rows of the digits protocol as Parquet; returns the row count."""
    d = digits_embeddings(rows=rows, dim=640, seed=seed)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(d.train_x.reshape(-1)), 640)
    table = pa.table({"embedding": emb, "digit": pa.array(NAMES[d.train_y]), "image": pa.array(d.train_image)})
    pq.write_table(table, path, row_group_size=4096)
    return table.num_rows


def parquet_chunks(path: str) -> Iterator[dict[str, Any]]:
    """Record batches of the file as `add_splat_chunks` chunks."""
    for b in pq.ParquetFile(path).iter_batches(batch_size=4096):
        emb = b.column("embedding")
        yield {"vectors": emb.flatten().to_numpy().reshape(-1, emb.type.list_size),
               "labels": b.column("digit").to_numpy(zero_copy_only=False),
               "metadata": {"image": b.column("image").to_numpy()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--out", default=None, help="directory for the Parquet file and the lake (default: temporary)")
    p.add_argument("--cli", action="store_true", help="ingest with `m2m ingest` instead of the Python API")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        return run(args.out, args.rows, args.seed, args.cli)
    with tempfile.TemporaryDirectory(prefix="m2m-parquet-") as out:
        return run(out, args.rows, args.seed, args.cli)


def run(out: str, rows: int, seed: int, cli: bool) -> int:
    """Write the Parquet file in ``out``, ingest it into ``out/lake``, stream one batch."""
    src, lake_dir = os.path.join(out, "digits.parquet"), os.path.join(out, "lake")
    n = write_parquet(src, rows, seed)
    print(f"wrote {n:,} rows to {src} ({os.path.getsize(src) / 1e6:.1f} MB)")

    if cli:
        subprocess.run([sys.executable, "-m", "m2m.cli.main", "ingest", src, "--lake", lake_dir,
                        "--label-column", "digit", "--quiet"], check=True)
    else:
        with create_m2m(M2MConfig(path=lake_dir, latent_dim=640)) as lake:
            ids = lake.add_splat_chunks(lambda: parquet_chunks(src))
            print(f"ingested {len(ids):,} rows into {lake_dir} as version {lake.version}")

    with open_lake(lake_dir) as lake:
        info = lake.info()
        print(f"lake: {info['rows']:,} rows x {info['dim']} {info['dtype']}, {info['shards']} shard(s), "
              f"version {info['version']}, labels {info['labels']}, metadata {info['metadata']}")
        columns = ("embedding", "label") + (("image",) if "image" in info["metadata"] else ())
        batch = next(iter(lake.export_to_dataloader(batch_size=8, columns=columns)))
        print("first batch:", {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()},
              "(string labels stream as int codes into the lake's label vocabulary)")
        splats = lake.splats(lake.splats()["id"][:3])
        print("first labels:", list(splats["label"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
