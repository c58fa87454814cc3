"""Per-shard geometry terms for augmenters that hold only the shards a process streams.

An augmenter built over whole-lake arrays (kappa, alpha and the neighbour table of every row) holds
them in every process: at 1B rows that is hundreds of GB (docs/scale.md, "What breaks first").
Built over `SplatTerms` instead, it reads the terms of a shard the first time one of that shard's
rows is augmented, keeps the derived tables of the shards it used last within a byte budget
(`ShardCache`) and drops the rest. That needs nothing outside the row's own shard: the geometry
sidecars carry each row's neighbours' kappa, alpha and label agreement (``neighbor_kappa``,
``neighbor_alpha``, ``neighbor_same_label``, written by the local engine's ``estimate_kappa``),
and the neighbours' means are gathered from the stream's source as before. With shard affinity a
rank so holds terms for its current shards only; a full shuffle touches every shard in every window,
so its cache must hold the whole lake to avoid rebuilding tables (docs/scale.md).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from m2m.errors import ConfigError

__all__ = ["DEFAULT_TERMS_BYTES", "ShardCache", "ShardTerms", "SplatTerms", "by_shard", "packed"]

#: default byte budget of the derived tables a by-shard augmenter keeps per process (`ShardCache`).
#: It should hold the shards one window of the stream draws from: with shard affinity a window's
#: blocks come from the rank's current group (half the node cache per local rank), ~22 shards of
#: 256k rows in the 1B-row simulation (docs/scale.md); a smaller budget rebuilds shards (logged).
DEFAULT_TERMS_BYTES = 2 << 30

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTerms:
    """The geometry terms of one shard's rows (positions are global row positions)."""

    kappa: np.ndarray                 # [n] float32, finite, >= 0
    alpha: np.ndarray                 # [n] float32, > 0
    neighbors: np.ndarray             # [n, k] int64 positions, -1 = none
    neighbor_cos: np.ndarray          # [n, k] float32
    neighbor_kappa: np.ndarray        # [n, k] float32 (any value where there is no neighbour)
    neighbor_alpha: np.ndarray        # [n, k] float32
    same_label: np.ndarray | None     # [n, k] bool, None on a lake without labels

    def valid(self, first: int) -> np.ndarray:
        """[n, k] which neighbours are components: present, not the row itself (rows start at global
        position ``first``), and of the row's label."""
        nb = self.neighbors
        ok = (nb >= 0) & (nb != np.arange(first, first + len(nb))[:, None])
        if self.same_label is not None:
            ok &= self.same_label
        return ok


class SplatTerms(Protocol):
    """Where a by-shard augmenter reads its terms: shard boundaries, k, and one shard's terms."""

    @property
    def shard_offsets(self) -> np.ndarray: ...   # int64 [num_shards + 1]

    @property
    def k(self) -> int: ...

    def terms(self, shard: int) -> ShardTerms: ...

    def kappa(self, shard: int) -> np.ndarray: ...   # [n] float32: what `VMFAugmenter` needs alone


def check_terms(t: ShardTerms, rows: int, k: int, total: int, shard: int, first: int) -> None:
    """`ConfigError` naming the first thing in ``t`` that an augmenter cannot use."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"geometry terms of shard {shard}: {what}")

    for name in ("kappa", "alpha"):
        v = getattr(t, name)
        if v.shape != (rows,):
            raise bad(f"{name} has shape {v.shape}, expected ({rows},)")
    for name in ("neighbors", "neighbor_cos", "neighbor_kappa", "neighbor_alpha"):
        v = getattr(t, name)
        if v.shape != (rows, k):
            raise bad(f"{name} has shape {v.shape}, expected ({rows}, {k})")
    if t.same_label is not None and t.same_label.shape != (rows, k):
        raise bad(f"same_label has shape {t.same_label.shape}, expected ({rows}, {k})")
    if not (np.isfinite(t.kappa).all() and (t.kappa >= 0).all()):
        raise bad("kappa must be finite and >= 0 (estimate it for every row: lake.estimate_kappa())")
    if not (np.isfinite(t.alpha).all() and (t.alpha > 0).all()):
        raise bad("alpha must be finite and > 0")
    nb = t.neighbors
    if nb.size and (nb.min() < -1 or nb.max() >= total):
        raise bad(f"neighbors holds positions outside [-1, {total})")
    valid = t.valid(first)
    k_nb, a_nb = t.neighbor_kappa[valid], t.neighbor_alpha[valid]
    if not (np.isfinite(k_nb).all() and (k_nb >= 0).all() and np.isfinite(a_nb).all() and (a_nb > 0).all()):
        raise bad("a neighbour's kappa or alpha is not finite and positive (estimate kappa for every row)")


T = TypeVar("T")


class ShardCache(Generic[T]):
    """Derived per-shard values (``build(shard)``), the least recently used dropped once they hold
    more than ``budget`` bytes (``size(value)``); the shards of the call in progress are kept even
    above it. Thread-safe: a shard is built once while other threads wait for it."""

    def __init__(self, build: Callable[[int], T], size: Callable[[T], int], budget: int) -> None:
        if budget < 0:
            raise ConfigError(f"terms budget must be >= 0 bytes, got {budget}")
        self._build, self._size, self.budget = build, size, int(budget)
        self._items: OrderedDict[int, tuple[T, int]] = OrderedDict()
        self._dropped: set[int] = set()
        self._lock = threading.Lock()
        self.bytes = 0
        self.peak_bytes = 0
        self.builds = 0
        self.rebuilds = 0

    def get_many(self, shards: Sequence[int]) -> list[T]:
        """The values of ``shards`` (built as needed), then the cache trimmed to its budget, keeping these."""
        with self._lock:
            out = []
            for s in shards:
                hit = self._items.get(s)
                if hit is None:
                    if s in self._dropped:
                        self.rebuilds += 1
                        if self.rebuilds == 1:
                            log.warning("augmentation terms of shard %d built again after the %.2f GB budget dropped "
                                        "them: the stream draws from more shards at a time than the budget holds "
                                        "(slower, not wrong; raise the budget, docs/augmentation.md)", s,
                                        self.budget / 1e9)
                    value = self._build(s)
                    hit = (value, int(self._size(value)))
                    self._items[s] = hit
                    self.bytes += hit[1]
                    self.builds += 1
                    self.peak_bytes = max(self.peak_bytes, self.bytes)
                else:
                    self._items.move_to_end(s)
                out.append(hit[0])
            keep = set(shards)
            for s in list(self._items):
                if self.bytes <= self.budget:
                    break
                if s not in keep:
                    self.bytes -= self._items.pop(s)[1]
                    self._dropped.add(s)
            return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_items=OrderedDict(), _dropped=set(), _lock=None, bytes=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def by_shard(rows: Tensor, offsets: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``rows`` (global positions) grouped by shard: ``[(shard, where in rows, local positions)]``."""
    r = rows.detach().to("cpu", torch.int64).numpy()
    shard = np.searchsorted(offsets, r, side="right") - 1
    if len(r) and (shard.min() < 0 or r.max() >= offsets[-1]):
        raise ConfigError(f"rows outside [0, {int(offsets[-1])})")
    order = np.argsort(shard, kind="stable")
    s_sorted = shard[order]
    cuts = np.flatnonzero(np.diff(s_sorted)) + 1
    out = []
    for part in np.split(order, cuts) if len(order) else []:
        s = int(shard[part[0]])
        out.append((s, part, r[part] - offsets[s]))
    return out


def packed(*tensors: Tensor) -> list[Tensor]:
    """Copies of ``tensors`` (CPU) laid out in one allocation, returned as views of it.

    A shard's tables live long and are dropped together. Allocated one by one they are each below
    glibc's largest mmap threshold (32 MiB), so they land in the heap between the short-lived
    temporaries of the next build, and the heap's fragments are never given back: on the 1B-row
    simulation a 1 GiB budget held 3-4 GB of RSS that way (benchmarks/results/scale-1b-sim-*). One
    allocation per shard is mapped, and unmapped when the shard is dropped.
    """
    sizes = [t.numel() * t.element_size() for t in tensors]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 16) * 16)          # 16-byte aligned views
    buf = torch.empty(starts[-1], dtype=torch.uint8)
    out = []
    for t, start, n in zip(tensors, starts, sizes):
        view = buf[start:start + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out


def tensor_bytes(obj: Any) -> int:
    """Bytes of the arrays among ``obj``'s dataclass fields (views of one allocation count its size)."""
    return sum(tensor_bytes_of(v) for v in vars(obj).values() if isinstance(v, (Tensor, np.ndarray)))


def tensor_bytes_of(value: Any) -> int:
    """Bytes of a tensor or array, or of those among a dataclass's fields."""
    if isinstance(value, Tensor):
        return int(value.numel() * value.element_size())
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return tensor_bytes(value)
