"""Several processes through torchrun: process-group set-up, DDP, and one clock for all ranks."""
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)
    or returns a single-process DistInfo when WORLD_SIZE is unset or 1. Backend: nccl for CUDA,
    gloo for CPU. ``device``: "cpu", "cuda" or None (CUDA when available)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev)


def unwrap(model: nn.Module) -> nn.Module:
    """The supernet inside torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around ``model`` when running with several processes.
    find_unused_parameters: a sub-network leaves parameters unused; broadcast_buffers off: the
    supernets' only buffers are architecture encodings, which every rank sets identically."""
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    with warnings.catch_warnings():  # torch 2.13 deprecates broadcast_buffers; its replacement
        warnings.simplefilter("ignore", FutureWarning)  # still syncs at init, which is harmless
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   find_unused_parameters=True,
                                                   broadcast_buffers=False)


def shared_clock(seconds: float, info: DistInfo) -> float:
    """Rank 0's ``seconds`` on every rank, so that all ranks take the same learning rate and
    decide alike when to checkpoint and when to stop."""
    if not info.enabled:
        return float(seconds)
    t = torch.tensor([float(seconds)], dtype=torch.float64, device=info.device)
    dist.broadcast(t, src=0)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
