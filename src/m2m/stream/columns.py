"""Which columns a batch carries, where each comes from and its delivered dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from m2m.errors import ConfigError, StreamError
from m2m.stream.source import RowSource, file_backed

EMBEDDING = "embedding"
WEIGHT = "weight"
ROWS = "_rows"  # internal: global row positions of a batch, always carried
SOURCE_OF = {EMBEDDING: "mu"}


@dataclass(frozen=True)
class Column:
    """One delivered column: ``name`` in the batch, ``source`` column (None = the plan's weights)."""

    name: str
    source: str | None
    storage_dtype: np.dtype
    out_dtype: torch.dtype
    trailing: tuple[int, ...]

    @property
    def stored(self) -> str:
        """The source column of a gathered column (`StreamSpec.gathered` holds only those)."""
        if self.source is None:
            raise StreamError(f"column {self.name!r} is not read from the source")
        return self.source

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as stored."""
        return int(np.prod(self.trailing, dtype=np.int64)) * self.storage_dtype.itemsize

    @property
    def out_row_bytes(self) -> int:
        """Bytes of one row as delivered."""
        return int(np.prod(self.trailing, dtype=np.int64)) * self.out_dtype.itemsize


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype."""
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def delivered_dtype(dtype: np.dtype) -> torch.dtype:
    """Floats as float32, bool as bool, uint8 as uint8, other integers as int64 (the source widens
    uint16/32/64 to a signed type first, `m2m.lake.schema.WIDENED`)."""
    if dtype.kind == "f":
        return torch.float32
    if dtype == np.uint8:
        return torch.uint8
    if dtype.kind in "iu":
        return torch.int64
    if dtype.kind == "b":
        return torch.bool
    raise ConfigError(f"a stream cannot carry columns of dtype {dtype}")


def valid_names(source: RowSource) -> list[str]:
    """Names a batch may ask for: embedding, weight, and every numeric source column except mu."""
    names = [EMBEDDING, WEIGHT]
    for name in source.column_names:
        if name == "mu" or name in names:
            continue
        if source.num_rows == 0 or _sample(source, name).dtype.kind in "biuf":
            names.append(name)
    return names


def _unknown(source: RowSource, name: str, valid: list[str]) -> ConfigError:
    if name in source.column_names and name != "mu":
        kind = "strings" if _sample(source, name).dtype.kind in "OUS" else f"{_sample(source, name).dtype} values"
        return ConfigError(f"column {name!r} holds {kind}, which a stream cannot carry as tensors; read it with "
                           f"lake.to_arrow() or lake.splats() (streamable columns: {', '.join(valid)})")
    return ConfigError(f"unknown column {name!r}; valid columns: {', '.join(valid)}")


def _sample(source: RowSource, name: str) -> np.ndarray:
    """An array with the dtype and trailing shape of column ``name`` (for its dtype and shape only).

    A lake snapshot describes its columns from its manifest (``column_sample``: no file read; the
    extent of shard 0 below still downloaded that whole shard on each rank of a remote lake). Else a
    fixed-width column of a file-backed source is described by its extent (Arrow metadata only):
    reading shard 0's column to learn its dtype read a whole shard per column when the loader was
    made (the ``mu`` of a 131k x 640 shard is 335 MB). Other columns come from the source.
    """
    sample = source.column_sample(name)  # a lake's from its manifest: no shard read
    if sample is not None:
        return sample
    files = file_backed(source)
    if files is not None:
        ext = files.column_extent(0, name)
        if ext is not None and ext.dtype:
            return np.empty((0,) if ext.list_size is None else (0, ext.list_size), dtype=np.dtype(ext.dtype))
    return source.column(0, name)


def resolve(source: RowSource, columns: Sequence[str] | None,
            embedding_dtype: torch.dtype | str | None = None) -> tuple[Column, ...]:
    """Columns to deliver; ``None`` means embeddings only. Unknown names raise ConfigError (a ValueError).
    ``embedding_dtype``: the embedding's delivered dtype (None: float32; "stored": its storage dtype)."""
    if isinstance(columns, str):
        raise ConfigError(f"columns must be a tuple of names, not the string {columns!r}")
    names = [EMBEDDING] if columns is None else list(columns)
    if not names:
        raise ConfigError(f"columns must name at least one column; valid columns: {', '.join(valid_names(source))}")
    valid = valid_names(source)
    for name in names:
        if name not in valid:
            raise _unknown(source, name, valid)
    if len(set(names)) != len(names):
        raise ConfigError(f"columns has duplicates: {names}")
    out = []
    for name in names:
        if name == WEIGHT:
            out.append(Column(name, None, np.dtype(np.float32), torch.float32, ()))
            continue
        src = SOURCE_OF.get(name, name)
        if source.num_rows:
            sample = _sample(source, src)
            dtype, trailing = sample.dtype, tuple(sample.shape[1:])
        else:
            dtype = source.storage_dtype if src == "mu" else np.dtype(np.float32)
            trailing = (source.dim,) if src == "mu" else ()
        out_dtype = delivered_dtype(np.dtype(dtype))
        if name == EMBEDDING and isinstance(embedding_dtype, torch.dtype):
            out_dtype = embedding_dtype
        elif name == EMBEDDING and embedding_dtype == "stored":
            out_dtype = torch_dtype(np.dtype(dtype))
        out.append(Column(name, src, np.dtype(dtype), out_dtype, trailing))
    return tuple(out)


def nominal_row_bytes(source: RowSource) -> int:
    """Bytes of one row over every source column: fixes block and window sizes per lake."""
    if source.num_rows == 0:
        return source.dim * np.dtype(source.storage_dtype).itemsize
    total = 0
    for name in source.column_names:
        sample = _sample(source, name)
        total += int(np.prod(sample.shape[1:], dtype=np.int64)) * sample.dtype.itemsize
    return max(1, total)


#: the smallest float64 magnitude that rounds to inf in float32: halfway from float32's max to 2**128
FLOAT32_OVERFLOW = float.fromhex("0x1.ffffffp+127")


def check_range(name: str, wide: torch.Tensor) -> None:
    """Before a float64 column is delivered as float32: a finite value that would round to +-inf there
    is a `StreamError` (1e300 streamed as inf without a word while `lake.take` read it exactly). Run
    on the host copy: on a CUDA tensor the test would wait for the device."""
    if wide.dtype != torch.float64:
        return
    over = wide.abs() >= FLOAT32_OVERFLOW    # (inf >= it too, and a stored inf arrives as inf)
    if bool(over.any()):
        finite = over & torch.isfinite(wide)
        if bool(finite.any()):
            value = float(wide[finite][0])
            raise StreamError(f"column {name!r} holds {value:g}, beyond float32's range: streams deliver float "
                              "columns as float32 (read it with lake.take or lake.to_arrow, or store it scaled)")
