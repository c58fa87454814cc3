"""How a DataLoader worker's items reach the consumer: packed into a few shared buffers each worker reuses.

torch sends every tensor of a worker's item as its own shared-memory file, whose descriptor the consumer
fetches over a new authenticated connection to the worker, then maps and faults in afresh: with five
columns that cost ~4 ms per 1,024-row item at d = 640 on this VM, more than augmenting the item
(docs/stream.md, "`num_workers`"). Here a worker packs an item's tensors into one slot of its `SlotRing`
(shared buffers it keeps), sends a slot's buffer the first time it is used in a pass and afterwards only
its number; the consumer's `SlotViews` rebuilds the tensors as views of its mapping of that buffer.

A slot goes back to its worker only when nothing in this process references the views made of it (the
storage's use count, as `m2m.stream.stages.hot.OutputPool` judges its buffers): batches the user keeps
are never overwritten, they only keep their slot busy. What the count cannot see is the same for the
in-line stream's pooled outputs: a batch sent on to another process (a torch.multiprocessing queue maps
the same memory there) or kept only as its ``untyped_storage()`` must be copied first. The consumer hands a slot back by writing the sequence number
of the last item it received from the slot into a shared counter (``done``); the worker reuses a slot whose
counter has reached the number of items it sent from it, so an item still on its way keeps its slot busy.
When no slot is free the item goes in one fresh shared buffer (all its columns in one file, not one file
each); nothing ever waits for a slot. Items torch drops when a pass ends early (persistent workers)
were never seen by the consumer: the worker's next pass starts by sending what it has issued, and the
consumer frees what it never received (once its views of the slot, if any, are gone).
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass

import torch

from m2m.errors import InternalError, StreamError
from m2m.stream.stages.hot import shared_empty, storage_use_count

__all__ = ["Packed", "SlotRing", "SlotViews"]

_ALIGN = 64          # bytes: each column starts on a cache line
_ROUND = 1 << 16     # slot capacity granularity (an epoch's last, shorter item fits a slot made for a full one)


Layout = tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]   # (name, dtype, shape, byte offset)


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[Layout, int]:
    out, offset = [], 0
    for name, t in tensors.items():
        out.append((name, t.dtype, tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return tuple(out), offset


def _views(buf: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    return {name: buf[off:off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, dtype, shape, off in layout}


def _shared_bytes(nbytes: int) -> torch.Tensor:
    return shared_empty((max(1, nbytes),), torch.uint8)


@dataclass
class Packed:
    """One item's tensors as they cross to the consumer: slot ``slot`` of ring ``token`` (``buffer`` only
    when the consumer may not have it yet), or (``slot`` -1) a fresh buffer of its own. ``done``: the
    ring's shared counters, on a pass's first item; ``issued``: what the ring had sent from each slot
    before that item."""

    token: str
    slot: int
    seq: int
    layout: Layout
    buffer: torch.Tensor | None
    done: torch.Tensor | None = None
    issued: tuple[int, ...] | None = None


class SlotRing:
    """A worker's shared buffers (``slots`` of them, made as items need them, grown when an item does
    not fit); `pack` copies an item's tensors into a free one."""

    def __init__(self, slots: int) -> None:
        self.token = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.done = torch.zeros(slots, dtype=torch.int64).share_memory_()  # written by the consumer only
        self.issued = [0] * slots
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.sent = [False] * slots
        self.announce = True
        self.fresh = 0   # items that found no free slot

    def close(self) -> None:
        """Let go of the shared buffers (a persistent worker's ring, when the worker exits: under torch's
        ``file_system`` sharing strategy a file stays in /dev/shm while any process holds it)."""
        self.buffers = [None] * len(self.buffers)
        self.done = torch.zeros(0, dtype=torch.int64)
        self.issued = [0] * len(self.issued)

    def new_pass(self) -> None:
        """The consumer of this pass may not hold what earlier passes sent: send it again."""
        self.sent = [False] * len(self.sent)
        self.announce = True

    def pack(self, tensors: dict[str, torch.Tensor]) -> Packed:
        layout, nbytes = _layout(tensors)
        slot = self._free_slot(nbytes)
        issued = tuple(self.issued) if self.announce else None
        done = self.done if self.announce else None
        if slot is None:
            self.fresh += 1
            buf = _shared_bytes(nbytes)
            _copy_in(buf, tensors, layout)
            self.announce = False
            return Packed(self.token, -1, 0, layout, buf, done, issued)
        slot_buf = self.buffers[slot]
        if slot_buf is None:
            raise InternalError(f"transport: free slot {slot} has no buffer")
        _copy_in(slot_buf, tensors, layout)
        self.issued[slot] += 1
        first = not self.sent[slot]
        self.sent[slot] = True
        self.announce = False
        return Packed(self.token, slot, self.issued[slot], layout, slot_buf if first else None, done, issued)

    def _free_slot(self, nbytes: int) -> int | None:
        done = self.done.tolist()
        free = [s for s in range(len(self.issued)) if done[s] == self.issued[s]]
        for s in free:
            buf = self.buffers[s]
            if buf is not None and buf.numel() >= nbytes:
                return s
        if not free:
            return None
        s = next((s for s in free if self.buffers[s] is None), free[0])
        self.buffers[s] = _shared_bytes(-(-nbytes // _ROUND) * _ROUND)   # a new buffer: sent again
        self.sent[s] = False
        return s


def _copy_in(buf: torch.Tensor, tensors: dict[str, torch.Tensor], layout: Layout) -> None:
    for (name, _, _, _), dst in zip(layout, _views(buf, layout).values()):
        dst.copy_(tensors[name])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _RingView:
    def __init__(self, done: torch.Tensor) -> None:
        self.done = done
        # slot -> its mappings here, each with its use count when only this holds it (one, unless a
        # resent buffer was mapped again while views of the first mapping were still alive)
        self.buffers: dict[int, list[tuple[torch.Tensor, int]]] = {}
        self.held: dict[int, int] = {}                           # slot -> sequence number to hand back
        self.received: dict[int, int] = {}                       # slot -> last sequence number received

    def release(self) -> None:
        # Ordering: the last view's release is an acquire-release decrement of the use count, and the
        # write below depends on that count through a branch; the worker reads ``done`` before it writes
        # the slot (again through a branch). x86 keeps loads before later stores, and ARMv8's dependency
        # ordering keeps this chain; a torn or stale read only makes a slot come back late, never early
        # (it must equal the worker's own count exactly).
        for slot, seq in list(self.held.items()):
            if all(storage_use_count(m) == base for m, base in self.buffers.get(slot, ())):
                self.done[slot] = seq
                del self.held[slot]


class SlotViews:
    """The consumer's side: the buffers of the rings it has heard from, and which slots it still holds."""

    def __init__(self) -> None:
        self._rings: dict[str, _RingView] = {}

    def unpack(self, p: Packed) -> dict[str, torch.Tensor]:
        """The item's tensors, as views of its buffer."""
        ring = self._rings.get(p.token)
        if ring is None:
            if p.done is None:
                raise StreamError(f"stream: an item of worker ring {p.token} arrived before its first item")
            ring = self._rings[p.token] = _RingView(p.done)
        if p.issued is not None:   # a new pass: items sent earlier and never received were dropped by torch
            for slot, n in enumerate(p.issued):
                if n > ring.received.get(slot, 0):
                    ring.received[slot] = ring.held[slot] = n
        for each in self._rings.values():   # hand back what the user has let go of
            each.release()
        buf, p.buffer = p.buffer, None
        if p.slot < 0:
            if buf is None:
                raise StreamError(f"stream: a fresh item of worker ring {p.token} arrived without its buffer")
            return _views(buf, p.layout)
        maps = ring.buffers.setdefault(p.slot, [])
        if buf is not None and not any(_same(m, buf) for m, _ in maps):
            if p.slot not in ring.held:   # a new buffer for a slot handed back: the old one is done with
                maps.clear()
            maps.append((buf, storage_use_count(buf)))
        if not maps:
            raise StreamError(f"stream: slot {p.slot} of worker ring {p.token} arrived without its buffer")
        ring.received[p.slot] = ring.held[p.slot] = p.seq
        return _views(maps[-1][0], p.layout)

