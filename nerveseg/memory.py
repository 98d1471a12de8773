"""Keeping freed memory for reuse, so that the CPU does not fault the same tensors in again at every batch.

A batch's activations on the CPU are tensors of tens to hundreds of MB. By default glibc's malloc gives
every allocation above 32 MB its own mmap and hands it back to the system when it is freed, so the next
batch asks the kernel again for the same memory, page by page, each page zeroed: millions of page faults
a run (what keeping it gained: docs/performance.md, "What changed"). PyTorch's CPU tuning guide gets the same
effect by preloading jemalloc or tcmalloc; this does it with the C library that is already there.

The price is memory that stays with the process: the heap grows over the first few batches (aligned blocks
do not always fit the places freed by the last batch) and then stays put; in the test, three 64 MB tensors a
batch settle at about 1.2 GB of heap. train.py's full-set peak is 2.4 GB with it (see docs/performance.md).
"""

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Serve allocations up to `limit` bytes from malloc's heap, and keep up to `limit` bytes of freed memory.

    Returns False where the C library has no glibc mallopt (macOS, Windows, musl): nothing changes there.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))
