"""Advisory memory hints (``madvise``): read-ahead of mapped ranges and huge pages for big buffers.

Both are hints; when the kernel refuses one, the code still works (only slower) and the failure is
logged at debug level.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from typing import Callable

import torch

log = logging.getLogger(__name__)

MADV_WILLNEED = 3
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22  # Linux >= 5.14: map a range's pages in one call instead of one fault each
MADV_POPULATE_WRITE = 23  # the same for pages about to be written (fresh anonymous memory)
MADV_COLLAPSE = 25  # Linux >= 6.1: back a populated range with huge pages now (synchronous)
PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
_libc: ctypes.CDLL | None = None


def madvise(address: int, length: int, advice: int) -> bool:
    """``madvise`` over the pages covering ``[address, address + length)``; False if refused."""
    global _libc
    if length <= 0:
        return True
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = address - address % PAGE
    if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length + address - start), advice) != 0:
        log.debug("madvise(%d) failed with errno %d", advice, ctypes.get_errno())
        return False
    return True


def empty_hugepage(shape: tuple[int, ...], dtype: torch.dtype, advise: bool = True) -> torch.Tensor:
    """An uninitialised CPU tensor aligned to 2 MiB and (``advise``) advised to use transparent huge pages.

    Huge pages cut TLB misses of random row gathers from the buffer (docs/tuning.md). Faulting them
    in can be slow: when free memory is fragmented the kernel compacts it first (``defrag=madvise``).
    ``advise=False`` only aligns the buffer: `collapse_huge` backs it with huge pages later, once
    it is filled. Small buffers get a plain ``torch.empty``.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    if advise:
        madvise(raw.data_ptr() + offset, nbytes - nbytes % HUGE_PAGE, MADV_HUGEPAGE)
    return raw[offset: offset + nbytes].view(dtype).view(shape)


def collapse_huge(tensor: torch.Tensor, stop: Callable[[], bool] = lambda: False, chunk: int = 32 << 20) -> bool:
    """Back the whole 2 MiB pages of a filled CPU tensor with transparent huge pages, ``chunk`` bytes
    per call (``MADV_COLLAPSE``; its contents are kept), until ``stop()``; False if the kernel refused."""
    start = tensor.data_ptr()
    first = start + (-start % HUGE_PAGE)
    end = start + tensor.numel() * tensor.element_size()
    end -= end % HUGE_PAGE
    if end <= first:
        return True
    if not madvise(first, end - first, MADV_HUGEPAGE):
        return False
    for lo in range(first, end, chunk):
        if stop():
            return True
        if not madvise(lo, min(chunk, end - lo), MADV_COLLAPSE):
            return False
    return True
