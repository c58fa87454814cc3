"""Input checks and float32 views of the unit-row matrices every m2m.index search reads."""

from __future__ import annotations

from typing import Any

import numpy as np

from m2m.errors import InvalidEmbeddingError

#: Rows converted to float32 at once when the input is float16 (bounds temporary memory).
CHUNK_ROWS = 65_536


def check_unit_rows(mu: Any, name: str = "mu", sample: int = 1024) -> np.ndarray:
    """Check that ``mu`` is a 2-D float16/float32 array of unit rows; return it (never copied).

    Shape and dtype are checked fully; finiteness and unit norm on an evenly spaced sample of
    ``sample`` rows (a full pass would cost as much as a search), naming the first bad row.
    """
    if not isinstance(mu, np.ndarray):
        raise InvalidEmbeddingError(f"{name} must be a numpy array, got {type(mu).__name__}")
    if mu.ndim != 2 or mu.shape[1] < 1:
        raise InvalidEmbeddingError(f"{name} must have shape [n, d], got {mu.shape}")
    if mu.dtype not in (np.float32, np.float16):
        raise InvalidEmbeddingError(f"{name} must be float32 or float16, got {mu.dtype}")
    n = mu.shape[0]
    if n:
        rows = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
        block = np.asarray(mu[rows], dtype=np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.linalg.norm(block, axis=1)
        bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-2)
        if bad.any():
            first = int(np.argmax(bad))
            raise InvalidEmbeddingError(
                f"{name} must hold finite unit rows; row {int(rows[first])} has norm {float(norms[first]):.6g}"
            )
    return mu


def rows_f32(mu: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """Rows of ``mu`` as a C-contiguous float32 array.

    float16 rows are converted and renormalised (float16 rounding leaves norms 1 +- 1e-3, which
    would put identical rows at cosine 0.999); float32 rows are returned as stored.
    """
    block = np.ascontiguousarray(mu[rows], dtype=np.float32)
    if mu.dtype == np.float16 and block.size:
        renormalise_(block)
    return block


def renormalise_(block: np.ndarray) -> None:
    """Scale the float32 rows of ``block`` to unit norm in place (float16 rows read as float32), a
    chunk of rows at a time so that the norms' temporaries stay small."""
    flat = block.reshape(-1, block.shape[-1])
    for lo in range(0, flat.shape[0], _NORM_CHUNK_ROWS):
        part = flat[lo:lo + _NORM_CHUNK_ROWS]
        part /= np.linalg.norm(part, axis=-1, keepdims=True)


_NORM_CHUNK_ROWS = 65536


def writable_tensor(a: np.ndarray) -> Any:
    """``torch.from_numpy(a)``, on a copy if ``a`` is read-only (torch does not wrap those safely)."""
    import torch

    return torch.from_numpy(a if a.flags.writeable else a.copy())

