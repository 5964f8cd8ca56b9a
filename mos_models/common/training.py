"""Training helpers shared by the supernets: sandwich/SPOS sampling, the sandwich step, mixed
precision, torchrun/DDP setup, the warmup + cosine schedule and a plain progress bar.

A supernet here is an nn.Module with ``set_arch(arch)``, where ``arch`` comes from a
``GeneSpace`` (mos_models.common.evolution). Architectures are drawn from ``arch_rng(seed, step)``,
a generator that depends on the seed and the step only, so every DDP rank draws the same
architecture each step and a resumed run draws what the killed run would have drawn.
"""
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .evolution import Arch, GeneSpace

SAMPLING = ("sandwich", "spos")
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def arch_rng(seed: int, step: int) -> random.Random:
    """The architecture generator of a training step: identical on every rank."""
    return random.Random(int(seed) * 1_000_003 + int(step))


def sample_archs(space: GeneSpace, rng: random.Random, mode: str = "sandwich") -> List[Arch]:
    """Architectures of one training step: sandwich = [largest, smallest, one random];
    spos (single path one-shot) = [one random]."""
    if mode == "sandwich":
        return [space.largest(), space.smallest(), space.sample(rng)]
    if mode == "spos":
        return [space.sample(rng)]
    raise ValueError(f"sample_archs: mode must be one of {SAMPLING}, got {mode!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def fused_adam_options(params) -> Dict[str, bool]:
    """``{"fused": True}`` for torch.optim.Adam/AdamW where every parameter is a floating-point
    tensor on a CPU or CUDA device (torch's fused kernels: one pass over all tensors instead of a
    loop of small ops), else ``{}``. On the 2-core CPU machine AdamW's step for the full-size
    BERT supernet took 64-76 ms fused, 430 ms with torch's default for CPU tensors (a loop over
    the tensors) and 356-700 ms with foreach; for the MoS supernet 103-104, 628 and 580-600 ms."""
    params = list(params)
    supported = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if params and supported else {}


class MixedPrecision:
    """``--amp off|bf16|fp16``: forward passes under torch.autocast in that dtype (parameters and
    optimizer state stay fp32); fp16 also scales the loss (torch.amp.GradScaler), bf16 needs no
    scaling. With "off" every method is a plain fp32 step."""

    def __init__(self, mode: str = "off", device_type: str = "cpu"):
        if mode not in AMP:
            raise ValueError(f"amp must be one of {tuple(AMP)}, got {mode!r}")
        self.mode, self.dtype, self.device_type = mode, AMP[mode], device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.dtype == torch.float16)

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params, clip_norm: float) -> Tensor:
        """Unscales the gradients, clips them to ``clip_norm``, steps (fp16: skips a step whose
        gradients overflowed) and returns the gradient norm before clipping."""
        self.scaler.unscale_(optimizer)
        norm = nn.utils.clip_grad_norm_(params, clip_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm


def sandwich_step(model: nn.Module, archs: List[Arch],
                  loss_fn: Callable[[nn.Module, Arch], Tensor],
                  precision: Optional[MixedPrecision] = None) -> List[float]:
    """Forward and backward of every architecture in ``archs``; gradients are summed in .grad
    (zero them before, step the optimizer after: ``precision.step`` when one is given).
    ``loss_fn(model, arch)`` runs the forward through ``model`` (the DDP wrapper, if any) after
    this function has called ``set_arch(arch)`` on the unwrapped supernet. Under DDP only the
    last backward all-reduces (the others run in ``no_sync``), which averages the summed
    gradients over the ranks. Returns the losses as floats."""
    precision = precision or MixedPrecision()
    losses = []
    inner = unwrap(model)
    for i, arch in enumerate(archs):
        inner.set_arch(arch)
        last = i == len(archs) - 1
        sync = nullcontext() if last or inner is model else model.no_sync()
        with sync:
            with precision.autocast():
                loss = loss_fn(model, arch)
            precision.backward(loss)
        losses.append(float(loss.detach()))
    return losses


# ----------------------------------------------------------------------------------------------
# torchrun / DistributedDataParallel

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


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# schedule and progress

def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int,
                         min_ratio: float = 0.0) -> float:
    """Learning-rate factor: linear warmup from ~0 to 1 over ``warmup_steps``, then cosine decay
    to ``min_ratio`` at ``total_steps`` (held there afterwards)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio))


class ProgressBar:
    """A one-line progress bar: redrawn in place on a terminal, a plain line at most every
    ``log_interval`` seconds otherwise (logs, CI). ``total`` may be None (unknown)."""

    def __init__(self, total: Optional[int], desc: str = "", enabled: bool = True, stream=None,
                 initial: int = 0, log_interval: float = 10.0):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n = self.start_n = initial
        self.start = self.last_draw = time.monotonic()
        self.interval = 0.2 if self.tty else log_interval
        self.metrics = ""

    def update(self, n: int = 1, **metrics) -> None:
        self.n += n
        if metrics:
            self.metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items())
        now = time.monotonic()
        if self.enabled and now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            head = f"{self.desc} [{bar}] {self.n}/{self.total}"
        else:
            head = f"{self.desc} {self.n}"
        line = f"{head} {rate:.2f} it/s {elapsed:.0f}s {self.metrics}"
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:160] + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), end="\n" if self.tty else "")
