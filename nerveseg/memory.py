"""How much memory is left (available_memory, which train.py's CACHE = auto asks), and keeping freed memory for
reuse, so that the CPU does not fault the same tensors in again at every batch.

A batch's activations on the CPU are tensors of tens to hundreds of MB. By default glibc's malloc gives
every allocation above 32 MB its own mmap and hands it back to the system when it is freed, so the next
batch asks the kernel again for the same memory, page by page, each page zeroed: millions of page faults
a run (what keeping it gained: docs/performance.md, "What changed"). PyTorch's CPU tuning guide gets the same
effect by preloading jemalloc or tcmalloc; this does it with the C library that is already there.

The price is memory that stays with the process: the heap grows over the first few batches (aligned blocks
do not always fit the places freed by the last batch) and then stays put; in the test, three 64 MB tensors a
batch settle at about 1.2 GB of heap. train.py's full-set peak is 2.4 GB with it (see docs/performance.md).
"""

import contextlib
import ctypes
from pathlib import Path

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


def available_memory(*, meminfo: Path = Path("/proc/meminfo"), cgroups: Path = Path("/sys/fs/cgroup"),
                     own_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process may still take: the system's MemAvailable, or less where a memory limit of its cgroup
    (v2: memory.max; v1: memory.limit_in_bytes) or of a cgroup above it leaves less; None where nothing says."""
    found = []
    with contextlib.suppress(OSError, ValueError):
        line = next(line for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:"))
        found.append(int(line.split()[1]) * 1024)
    for folder in cgroup_folders(cgroups, own_cgroup):
        for limit_file, usage_file in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            with contextlib.suppress(OSError, ValueError):  # "max" (no limit) is not a number
                found.append(int((folder / limit_file).read_text()) - int((folder / usage_file).read_text()))
    return max(min(found), 0) if found else None


def cgroup_folders(cgroups: Path, own_cgroup: Path) -> list[Path]:
    """The folders of this process's memory cgroup and of those above it (v2 and v1 hierarchies)."""
    folders = []
    with contextlib.suppress(OSError):
        for line in own_cgroup.read_text().splitlines():
            _, controllers, name = line.split(":", 2)
            if controllers in ("", "memory") or "memory" in controllers.split(","):
                root = cgroups if controllers == "" else cgroups / "memory"
                folder = root / name.lstrip("/")
                folders += [folder, *[p for p in folder.parents if p.is_relative_to(root)]]
    return folders
