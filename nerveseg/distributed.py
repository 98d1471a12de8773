"""Running under torchrun (DistributedDataParallel) or as a single process, with the same code.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process and every helper here
is a no-op. NCCL is used on CUDA, gloo on the CPU. The device is chosen by nerveseg/device.py.
"""

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from nerveseg.device import choose_device


@dataclass(frozen=True)
class Process:
    """Who this process is."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, draws and writes files."""
        return self.rank == 0

    def print0(self, *args: object, **kwargs: object) -> None:
        """print, on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)


def start(device_name: str, *, gpus_shared: bool = False) -> Process:
    """Join the process group when launched by torchrun; pick this process's device. `gpus_shared`: there may be
    more processes than GPUs (process k takes GPU k modulo their number), which exchange only a few small objects,
    over gloo (prediction); else each process has a GPU of its own, and NCCL joins them (training)."""
    if "RANK" not in os.environ:
        return Process(0, 1, choose_device(device_name, 0))
    local_rank = int(os.environ["LOCAL_RANK"])
    if gpus_shared and torch.cuda.is_available():
        local_rank %= torch.cuda.device_count()
    device = choose_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    nccl = device.type == "cuda" and not gpus_shared
    dist.init_process_group(backend="nccl" if nccl else "gloo", device_id=device if nccl else None)
    return Process(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_sum(values: torch.Tensor, process: Process) -> torch.Tensor:
    """The element-wise sum over all processes (float64 sums stay exact for our counts)."""
    if process.world_size == 1:
        return values
    reduced = values.to(process.device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def mean_of_sums(total: torch.Tensor, count: int, process: Process) -> float:
    """The mean over all processes of what each summed (`total`) over its `count` items."""
    sums = all_reduce_sum(torch.stack([total.detach().cpu().double(), torch.tensor(count, dtype=torch.float64)]),
                          process)
    return float(sums[0] / sums[1])


T = TypeVar("T")


def from_main(value: T, process: Process) -> T:
    """Rank 0's value of something every process works out for itself (a run folder named by the time it starts,
    or given a suffix by rank 0 alone): the same on every process."""
    if process.world_size == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def wait_for_all(process: Process) -> None:
    """Return when every process has got here (a barrier; nothing to wait for in one process)."""
    if process.world_size > 1:
        dist.barrier()


def stop() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()
