"""Hot tier: getting an item onto its device in the delivered dtypes.

Three modes (`HotStage.mode`):

* ``"cpu"`` — batches stay on the host; columns whose storage dtype differs from the delivered
  one (float16 mu -> float32) are converted into fresh tensors, the rest are already fresh.
* ``"staged"`` — CUDA, lake larger than ``hot_bytes``: the host tier gathers straight into a
  ring of pinned buffers (`HostBuffers`), each item is copied with ``non_blocking`` on a side
  stream and converted there; the consumer waits on the item's event (`finish`). A pinned slot
  is reused only after the event of its last copy completed, so with ``slots >= 2`` the gather
  of item i+1 overlaps the copy of item i (double buffering).
* ``"resident"`` — CUDA, lake within ``hot_bytes``: the needed columns live on the device
  (`ResidentTier`) and each item is one ``index_select`` there; only row indices cross the bus.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from m2m.stream.columns import ROWS, WEIGHT, Column, check_range, torch_dtype
from m2m.stream.stages.base import Stage, Work
from m2m.stream.stages.cold import ColdReader, fill_common

log = logging.getLogger(__name__)

CPU, STAGED, RESIDENT = "cpu", "staged", "resident"


def storage_use_count(t: torch.Tensor) -> int:
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


POOLING = hasattr(torch._C, "_storage_Use_Count")
if not POOLING:  # pragma: no cover - depends on the torch build
    log.debug("torch lacks _storage_Use_Count: output buffers are allocated fresh for every item")


class OutputPool:
    """Reusable output tensors: a buffer is handed out again only when nothing else references it.

    Fresh multi-megabyte tensors cost page faults on every item (docs/tuning.md); reusing a buffer the consumer still holds would corrupt its
    batches. A buffer is free when its storage's reference count is back to what the pool alone
    holds, so batches kept by the user (in a list, or saved by autograd) are never overwritten;
    when every pooled buffer is in use, a fresh tensor is returned.
    """

    def __init__(self, size: int = 8, shared: bool = False) -> None:
        """``shared``: fresh tensors are made in shared memory (a DataLoader worker's outputs, which
        the DataLoader would otherwise copy there before sending: a 15.7 MB item took 12.4 ms to
        fill and pickle that way against 7.7 ms made shared)."""
        self.size = size
        self.shared = shared
        self._pool: dict[tuple[str, torch.dtype], list[tuple[torch.Tensor, int]]] = {}
        self.fresh = 0

    def get(self, name: str, rows: int, trailing: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not POOLING or self.size == 0:
            self.fresh += 1
            return shared_empty((rows, *trailing), dtype) if self.shared else torch.empty((rows, *trailing), dtype=dtype)
        entries = self._pool.setdefault((name, dtype), [])
        for i, (buf, base) in enumerate(entries):
            if buf.shape[1:] == trailing and storage_use_count(buf) == base:
                if buf.shape[0] >= rows:
                    return buf[:rows]
                del entries[i]  # too small for this item: replace it
                break
        if len(entries) >= self.size:
            self.fresh += 1
            return torch.empty((rows, *trailing), dtype=dtype)
        buf = torch.empty((rows, *trailing), dtype=dtype)
        entries.append((buf, storage_use_count(buf)))
        return buf[:rows]  # a view: its holder counts as a reference (the pooled tensor itself does not)


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose storage is in shared memory from the start."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


class HostBuffers:
    """Destinations of host gathers: pooled outputs, or a ring of ``slots`` reused (pinned) staging sets.

    A column is gathered into ring staging when a later step copies it anyway (a dtype
    conversion, or the device copy from pinned memory); otherwise straight into a pooled output
    (see `OutputPool`), which is what the batch hands to the user.
    """

    def __init__(self, pinned: bool = False, slots: int = 1, pool: OutputPool | None = None) -> None:
        self.pinned = pinned
        self.pool = pool if pool is not None else OutputPool()
        self._ring: list[dict[str, torch.Tensor]] = [{} for _ in range(max(1, slots))]
        self._events: list[object | None] = [None] * max(1, slots)
        self._slot = -1

    def begin(self) -> None:
        """Move to the next ring slot, waiting until its previous device copy has finished."""
        self._slot = (self._slot + 1) % len(self._ring)
        event = self._events[self._slot]
        if event is not None:
            # events are torch.cuda.Event or None, stored as object so CPU-only paths need no CUDA types
            event.synchronize()  # type: ignore[attr-defined]
            self._events[self._slot] = None

    def record(self, event: object) -> None:
        """The current slot's buffers are being read until ``event`` completes."""
        self._events[self._slot] = event

    def get(self, col: Column, rows: int, converting: bool = False) -> torch.Tensor:
        """Where ``rows`` rows of ``col`` are gathered: in its storage dtype, or (``converting``: the
        gather converts as it copies) straight into a pooled output in the delivered dtype."""
        dtype = torch_dtype(col.storage_dtype)
        if converting and not self.pinned:
            return self.pool.get(col.name, rows, col.trailing, col.out_dtype)
        if not (self.pinned or dtype != col.out_dtype):
            return self.pool.get(col.name, rows, col.trailing, dtype)
        ring = self._ring[max(self._slot, 0)]
        buf = ring.get(col.name)
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty((rows, *col.trailing), dtype=dtype, pin_memory=self.pinned)
            ring[col.name] = buf
        return buf[:rows]


def _convert(tensors: dict[str, torch.Tensor], columns: Sequence[Column], pool: OutputPool | None = None,
             checked: bool = False) -> None:
    """Each tensor in its column's delivered dtype; a float64 one's range is checked first unless
    ``checked`` (on the host copy, before a device copy: `check_range`)."""
    for col in columns:
        t = tensors.get(col.name)
        if t is None or t.dtype == col.out_dtype:
            continue
        if not checked and col.out_dtype != torch.float64:
            check_range(col.name, t)
        if pool is None or t.device.type != "cpu":
            out = t.to(col.out_dtype)
        else:
            out = pool.get(col.name, t.shape[0], tuple(t.shape[1:]), col.out_dtype)
            out.copy_(t)
        tensors[col.name] = out


class HotStage(Stage):
    """Delivers host-gathered items on ``device``: ``"cpu"`` (convert only) or ``"staged"`` (CUDA)."""

    def __init__(self, upstream: Stage | None, columns: Sequence[Column], device: torch.device,
                 buffers: HostBuffers | None = None) -> None:
        self.upstream = upstream
        self.columns = tuple(columns)
        self.device = device
        self.mode = STAGED if device.type == "cuda" else CPU
        self.buffers = buffers
        self._stream = torch.cuda.Stream(device) if self.mode == STAGED else None

    def __next__(self) -> Work:
        assert self.upstream is not None
        return self.process(next(self.upstream))

    def process(self, work: Work) -> Work:
        """Convert (and on CUDA, copy) one item's tensors; sets ``work.ready`` to an event on CUDA."""
        if self._stream is None:
            _convert(work.tensors, self.columns, self.buffers.pool if self.buffers is not None else None)
            return work
        for col in self.columns:   # on the host: on the device the check would wait for the copy
            if col.name in work.tensors and col.out_dtype != torch.float64:
                check_range(col.name, work.tensors[col.name])
        with torch.cuda.stream(self._stream):
            moved = {k: t.to(self.device, non_blocking=True) for k, t in work.tensors.items()}
            work.count("hot_bytes", sum(t.nbytes for t in work.tensors.values()))
            _convert(moved, self.columns, checked=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        if self.buffers is not None:
            self.buffers.record(event)
        work.tensors, work.ready = moved, event
        return work


def finish(work: Work) -> None:
    """In the consuming thread: make the current CUDA stream wait for the item's copy or gather."""
    if work.ready is None:
        return
    stream = torch.cuda.current_stream(next(iter(work.tensors.values())).device)
    stream.wait_event(work.ready)
    for t in work.tensors.values():
        t.record_stream(stream)
    work.ready = None


def resident_bytes(columns: Sequence[Column], num_rows: int) -> int:
    """Device bytes `ResidentTier` needs for ``columns`` of ``num_rows`` rows."""
    return num_rows * sum(c.row_bytes for c in columns if c.source is not None)


class ResidentTier:
    """The needed source columns copied once to ``device``; gathers run there."""

    def __init__(self, reader: ColdReader, columns: Sequence[Column], device: torch.device,
                 chunk_rows: int = 1 << 16) -> None:
        self.columns = tuple(c for c in columns if c.source is not None)
        self.device = device
        n = reader.num_rows
        self._data: dict[str, torch.Tensor] = {}
        for col in self.columns:
            dtype = torch_dtype(col.storage_dtype)
            dev = torch.empty((n, *col.trailing), dtype=dtype, device=device)
            host = torch.empty((min(n, chunk_rows), *col.trailing), dtype=dtype,
                               pin_memory=device.type == "cuda")
            host_np = host.numpy()
            for lo in range(0, n, chunk_rows):
                hi = min(n, lo + chunk_rows)
                reader.read_rows(col.stored, lo, hi, host_np[: hi - lo])
                if col.out_dtype != torch.float64:
                    check_range(col.name, host[: hi - lo])   # once, here: not per batch on the device
                dev[lo:hi].copy_(host[: hi - lo])  # synchronous: the pinned chunk is reused next
            self._data[col.stored] = dev

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._data.values())

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows (a LongTensor on the device) of every column, in the delivered dtypes."""
        out = {c.name: self._data[c.stored].index_select(0, rows) for c in self.columns}
        _convert(out, self.columns, checked=True)   # (ranges checked when the tier was filled)
        return out

    def gather_mu(self, rows: torch.Tensor) -> torch.Tensor:
        return self._data["mu"].index_select(0, rows).to(torch.float32)


class ResidentStage(Stage):
    """Gathers each item on the device from a `ResidentTier` (on a side stream when CUDA)."""

    def __init__(self, upstream: Stage | None, tier: ResidentTier, columns: Sequence[Column]) -> None:
        self.upstream = upstream
        self.tier = tier
        self.columns = tuple(columns)
        self._stream = torch.cuda.Stream(tier.device) if tier.device.type == "cuda" else None

    def __next__(self) -> Work:
        assert self.upstream is not None
        return self.process(next(self.upstream))

    def process(self, work: Work) -> Work:
        """Gather one item's columns on the device (rows/weights come from the order)."""
        if ROWS not in work.tensors:
            fill_common(work, self.columns)
        host = {k: work.tensors[k] for k in (ROWS, WEIGHT) if k in work.tensors}
        if self._stream is None:
            moved = {k: t.to(self.tier.device) for k, t in host.items()}
            moved.update(self.tier.gather(moved[ROWS]))
            work.tensors = moved
            return work
        with torch.cuda.stream(self._stream):
            moved = {k: t.pin_memory().to(self.tier.device, non_blocking=True) for k, t in host.items()}
            moved.update(self.tier.gather(moved[ROWS]))
            event = torch.cuda.Event()
            event.record(self._stream)
        work.count("hot_bytes", sum(t.nbytes for k, t in moved.items() if k not in host))
        work.tensors, work.ready = moved, event
        return work

