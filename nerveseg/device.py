"""The device a script runs on, and mixed precision on it."""

import contextlib

import torch

from nerveseg.errors import UserError


def choose_device(name: str, local_rank: int) -> torch.device:
    """ "auto" picks CUDA when there is a GPU; under torchrun each process takes GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but PyTorch sees no GPU; use --device cpu or auto")
        return torch.device("cuda", local_rank if name == "cuda" else torch.device(name).index)
    if name not in ("cpu", "mps"):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {name!r}")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op elsewhere."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
