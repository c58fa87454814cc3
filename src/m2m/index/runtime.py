"""How m2m.index runs: the lazy FAISS import, thread limits, and the matrix precision of this CPU.

FAISS is imported inside functions only, so ``import m2m`` never loads it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from typing import Any

from m2m._validate import check_threads
from m2m.errors import ConfigError, MissingDependencyError

#: FAISS/torch threads used when a caller passes ``threads=None``: one, because on a shared,
#: oversubscribed machine more threads were often slower (docs/tuning.md); the one long job,
#: ``Lake.estimate_kappa``, asks for every usable core itself.
DEFAULT_THREADS = 1


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_PRECISIONS = ("auto", "float32", "bfloat16")


def require_faiss() -> Any:
    """Import and return the ``faiss`` module, or raise ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
        raise MissingDependencyError(
            "m2m.index needs FAISS; install it with `pip install faiss-cpu` (or faiss-gpu)"
        ) from exc
    return faiss


@contextlib.contextmanager
def compute_threads(threads: int | None) -> Iterator[Any]:
    """Run a block with FAISS (OpenMP) and torch limited to ``threads`` threads; yields faiss.

    Also lowers FAISS' BLAS threshold so small query batches use BLAS. Every setting is
    restored on exit.
    """
    import torch

    faiss = require_faiss()
    n = check_threads(DEFAULT_THREADS if threads is None else threads)
    old_faiss = faiss.omp_get_max_threads()
    old_blas = faiss.cvar.distance_compute_blas_threshold
    old_torch = torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    faiss.cvar.distance_compute_blas_threshold = 20
    torch.set_num_threads(n)
    try:
        yield faiss
    finally:
        faiss.omp_set_num_threads(old_faiss)
        faiss.cvar.distance_compute_blas_threshold = old_blas
        torch.set_num_threads(old_torch)


@functools.lru_cache(maxsize=1)
def bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 natively (so results never depend on a timing race).

    From the CPU flags where Linux reports them (x86 ``avx512_bf16`` / ``amx_bf16``); otherwise
    from a small timing probe (bfloat16 at least 1.4x faster than float32).
    """
    import torch

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            info = f.read()
    except OSError:
        info = ""
    if "flags" in info:
        flags = set(info.split())
        return bool({"avx512_bf16", "amx_bf16"} & flags)

    a = torch.randn(256, 384, generator=torch.Generator().manual_seed(0))
    b = torch.randn(512, 384, generator=torch.Generator().manual_seed(1))
    timings = []
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y.T
        t0 = time.perf_counter()
        for _ in range(5):
            x @ y.T
        timings.append(time.perf_counter() - t0)
    return timings[1] < 0.7 * timings[0]


def resolve_precision(precision: str, dim: int = 384) -> str:
    """``"float32"`` or ``"bfloat16"``.

    ``"auto"`` picks bfloat16 when this CPU multiplies it faster and ``dim >= 128`` (the rounding
    noise of bfloat16 inputs on a unit-vector product is about 2**-9 * sqrt(3 / dim): 1e-4 at
    384 dims, but 6e-4 at 32, where float32 is cheap anyway).
    """
    if precision not in _PRECISIONS:
        raise ConfigError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if dim >= 128 and bf16_native() else "float32"
    return precision

