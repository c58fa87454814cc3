"""Turn validated splats into shard files and the manifest fields that describe them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from m2m._validate import SplatBatch, normalise_rows
from m2m.errors import InvalidEmbeddingError
from m2m.lake.fs import LakeFS
from m2m.lake.manifest import Manifest, ShardEntry
from m2m.lake.shard import write_shard_file

logger = logging.getLogger(__name__)

_ROW_OVERHEAD = 8 + 4 + 4 + 8  # id, kappa, alpha, label


def shard_rows(dim: int, dtype: str, shard_bytes: int) -> int:
    """Rows per shard so that a shard file is about ``shard_bytes``."""
    itemsize = np.dtype(dtype).itemsize
    return max(1, shard_bytes // (dim * itemsize + _ROW_OVERHEAD))


@dataclass(frozen=True)
class SchemaUpdate:
    """Label type, vocabulary and metadata types after an append."""

    label_type: str | None
    label_vocabulary: tuple[str, ...]
    metadata: dict[str, str]


def reconcile_schema(base: Manifest, batch: SplatBatch) -> SchemaUpdate:
    """Check the batch's labels and metadata against the lake's schema (the first append defines it)."""
    first = base.rows == 0 and base.label_type is None and not base.metadata
    label_type = None
    if batch.labels is not None:
        label_type = "string" if batch.labels.dtype == object else "int64"
    if not first:
        if label_type != base.label_type:
            have = "no labels" if base.label_type is None else f"{base.label_type} labels"
            got = "no labels" if label_type is None else f"{label_type} labels"
            raise InvalidEmbeddingError(f"the lake holds {have}; this call gives {got}")
        if set(batch.metadata) != set(base.metadata):
            raise InvalidEmbeddingError(
                f"metadata columns {sorted(batch.metadata)} differ from the lake's {sorted(base.metadata)}")
    metadata = dict(base.metadata)
    for name, values in batch.metadata.items():
        typ = pa.string() if values.dtype == object else pa.from_numpy_dtype(values.dtype)
        if name in metadata and str(typ) != metadata[name]:
            try:
                pa.array(values[:1].tolist() if values.dtype == object else values[:1]).cast(
                    pa.type_for_alias(metadata[name]))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                raise InvalidEmbeddingError(
                    f"metadata[{name!r}] has type {typ}, the lake's column is {metadata[name]}") from exc
        metadata.setdefault(name, str(typ))
    vocab = base.label_vocabulary
    if label_type == "string":
        known = set(vocab)
        new = [v for v in dict.fromkeys(batch.labels.tolist()) if v not in known]
        vocab = vocab + tuple(new)
    return SchemaUpdate(label_type or base.label_type, vocab, metadata)


def write_splats(fs: LakeFS, batch: SplatBatch, first_id: int, dim: int, dtype: str, shard_bytes: int,
                 schema: SchemaUpdate, progress: Callable[[int], None] | None = None) -> list[ShardEntry]:
    """Write ``batch`` as shard files (chunked: never more than one shard of rows in RAM at a time)."""
    step = shard_rows(dim, dtype, shard_bytes)
    shards = []
    for lo in range(0, batch.rows, step):
        hi = min(lo + step, batch.rows)
        mu = normalise_rows(batch.vectors[lo:hi])
        if dtype != "float32":
            mu = mu.astype(dtype)
        ids = np.arange(first_id + lo, first_id + hi, dtype=np.int64)
        cols: dict[str, np.ndarray | pa.Array] = {"id": ids, "mu": mu, "kappa": batch.kappa[lo:hi],
                                                   "alpha": batch.alpha[lo:hi]}
        if batch.labels is not None:
            cols["label"] = batch.labels[lo:hi]
        for name, values in batch.metadata.items():
            typ = pa.type_for_alias(schema.metadata[name])
            chunk = values[lo:hi]
            cols[name] = pa.array(chunk.tolist() if chunk.dtype == object else chunk).cast(typ)
        entry = write_shard_file(fs, cols)
        shards.append(ShardEntry(rows=hi - lo, id_min=int(ids[0]), id_max=int(ids[-1]), files=(entry,)))
        logger.debug("wrote shard %s (%d rows)", entry.path, hi - lo)
        if progress is not None:
            progress(hi - lo)
    return shards
