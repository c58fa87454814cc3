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

from typing import Sequence

import torch

from m2m.stream.columns import ROWS, WEIGHT, Column
from m2m.stream.stages.base import Stage, Work
from m2m.stream.stages.cold import ColdReader, fill_common
from m2m.stream.stages.warm import _torch_dtype

CPU, STAGED, RESIDENT = "cpu", "staged", "resident"


class HostBuffers:
    """Destinations of host gathers: fresh tensors, or a ring of ``slots`` reused (pinned) sets.

    A column is written into a reused buffer only when a later step copies it anyway (a dtype
    conversion, or the device copy from pinned memory); otherwise each item gets a fresh tensor
    so batches handed to the user are never overwritten.
    """

    def __init__(self, pinned: bool = False, slots: int = 1) -> None:
        self.pinned = pinned
        self._ring: list[dict[str, torch.Tensor]] = [{} for _ in range(max(1, slots))]
        self._events: list[object | None] = [None] * max(1, slots)
        self._slot = -1

    def begin(self) -> None:
        """Move to the next ring slot, waiting until its previous device copy has finished."""
        self._slot = (self._slot + 1) % len(self._ring)
        event = self._events[self._slot]
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]
            self._events[self._slot] = None

    def record(self, event: object) -> None:
        """The current slot's buffers are being read until ``event`` completes."""
        self._events[self._slot] = event

    def get(self, col: Column, rows: int) -> torch.Tensor:
        dtype = _torch_dtype(col.storage_dtype)
        if not (self.pinned or dtype != col.out_dtype):
            return torch.empty((rows, *col.trailing), dtype=dtype)
        ring = self._ring[max(self._slot, 0)]
        buf = ring.get(col.name)
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty((rows, *col.trailing), dtype=dtype, pin_memory=self.pinned)
            ring[col.name] = buf
        return buf[:rows]


def _convert(tensors: dict[str, torch.Tensor], columns: Sequence[Column]) -> None:
    for col in columns:
        t = tensors.get(col.name)
        if t is not None and t.dtype != col.out_dtype:
            tensors[col.name] = t.to(col.out_dtype)


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
            _convert(work.tensors, self.columns)
            return work
        with torch.cuda.stream(self._stream):
            moved = {k: t.to(self.device, non_blocking=True) for k, t in work.tensors.items()}
            work.count("hot_bytes", sum(t.nbytes for t in work.tensors.values()))
            _convert(moved, self.columns)
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
            dtype = _torch_dtype(col.storage_dtype)
            dev = torch.empty((n, *col.trailing), dtype=dtype, device=device)
            host = torch.empty((min(n, chunk_rows), *col.trailing), dtype=dtype,
                               pin_memory=device.type == "cuda")
            host_np = host.numpy()
            for lo in range(0, n, chunk_rows):
                hi = min(n, lo + chunk_rows)
                reader.read_rows(col.source, lo, hi, host_np[: hi - lo])
                dev[lo:hi].copy_(host[: hi - lo])  # synchronous: the pinned chunk is reused next
            self._data[col.source] = dev

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._data.values())

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows (a LongTensor on the device) of every column, in the delivered dtypes."""
        out = {c.name: self._data[c.source].index_select(0, rows) for c in self.columns}
        _convert(out, self.columns)
        return out

    def gather_mu(self, rows: torch.Tensor) -> torch.Tensor:
        return self._data["mu"].index_select(0, rows).to(torch.float32)


class ResidentStage(Stage):
    """Gathers each item on the device from a `ResidentTier` (on a side stream when CUDA)."""

    def __init__(self, upstream: Stage | None, tier: ResidentTier, columns: Sequence[Column]) -> None:
        self.upstream = upstream
        self.tier = tier
        self.columns = tuple(columns)
        self.mode = RESIDENT
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

