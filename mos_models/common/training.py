"""The pieces of a supernet training step: sampling, seeds, batch indices, the sandwich step, mixed precision,
the optimizer options, the learning-rate schedule and the progress bar.

A supernet here is an nn.Module with ``set_arch(arch)``, where ``arch`` comes from a
``GeneSpace`` (mos_models.common.evolution). Everything random in a step is drawn from
generators that depend on (seed, step) and the rank only: the architectures from
``arch_rng(seed, step)`` (the same on every rank), dropout and data noise from
``step_seed(seed, step, rank)``. So every rank draws the same architectures, a resumed run
draws what the killed run would have drawn, and two runs with one seed see the same batches.
"""
import math
import random
import sys
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .distributed import unwrap
from .evolution import Arch, GeneSpace

SAMPLING = ("sandwich", "spos")
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def arch_rng(seed: int, step: int) -> random.Random:
    """The architecture generator of a training step: identical on every rank."""
    return random.Random(int(seed) * 1_000_003 + int(step))


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of a step's other randomness (dropout, masking): differs per rank and step."""
    return (int(seed) * 1_000_003 + int(step)) * 64 + int(rank)


def sample_archs(space: Optional[GeneSpace], rng: random.Random, mode: str = "sandwich") -> List[Arch]:
    """Architectures of one training step: sandwich = [largest, smallest, one random];
    spos (single path one-shot) = [one random]. ``space`` None (a static model): [None]."""
    if mode not in SAMPLING:
        raise ValueError(f"sample_archs: mode must be one of {SAMPLING}, got {mode!r}")
    if space is None:
        return [None]
    if mode == "sandwich":
        return [space.largest(), space.smallest(), space.sample(rng)]
    return [space.sample(rng)]


def batch_indices(step: int, count: int, batch_size: int, rank: int, world: int,
                  seed: int) -> torch.Tensor:
    """Indices (of ``count`` training examples: blocks, sentences) of this rank's batch at
    ``step``: one seeded permutation per epoch, each global batch split across the ranks."""
    per_epoch = count // (batch_size * world)
    if per_epoch == 0:
        raise ValueError(f"train: {count} training examples are fewer than one global batch "
                         f"of {batch_size * world}; lower --batch-size (or --seq-len)")
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(count, generator=g)
    start = (i * world + rank) * batch_size
    return perm[start:start + batch_size]


def fused_adam_options(params) -> Dict[str, bool]:
    """``{"fused": True}`` for torch.optim.Adam/AdamW where every parameter is a floating-point
    tensor on a CPU or CUDA device, else ``{}``. torch's fused kernel makes one pass over all
    tensors; its CPU default loops over them, which costs more than the MoS layers themselves
    on the larger supernets."""
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


LossFn = Callable[[nn.Module, Arch], Tensor]


def sandwich_step(model: nn.Module, archs: List[Arch], loss_fn: LossFn,
                  precision: Optional[MixedPrecision] = None) -> List[float]:
    """Forward and backward of every architecture in ``archs``; gradients are summed in .grad
    (zero them before, step the optimizer after: ``precision.step`` when one is given).
    ``loss_fn(model, arch)`` runs the forward through ``model`` (the DDP or compiled wrapper, if
    any) after this function has called ``set_arch(arch)`` on the supernet inside (not for an
    arch of None: a static model). Under DDP only the last backward all-reduces (the others run
    in ``no_sync``), which averages the summed gradients over the ranks. Returns the losses."""
    precision = precision or MixedPrecision()
    losses = []
    inner = unwrap(model)
    ddp = isinstance(getattr(model, "_orig_mod", model), nn.parallel.DistributedDataParallel)
    for i, arch in enumerate(archs):
        if arch is not None:
            inner.set_arch(arch)
        last = i == len(archs) - 1
        with nullcontext() if last or not ddp else model.no_sync():
            with precision.autocast():
                loss = loss_fn(model, arch)
            precision.backward(loss)
        losses.append(float(loss.detach()))
    return losses


# ----------------------------------------------------------------------------------------------
# schedule and progress

def warmup_cosine_factor(step: float, warmup_steps: int, total_steps: int,
                         min_ratio: float = 0.0) -> float:
    """Learning-rate factor: linear warmup from ~0 to 1 over ``warmup_steps``, then cosine decay
    to ``min_ratio`` at ``total_steps`` (held there afterwards)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.0,
              time_fraction: Optional[float] = None) -> float:
    """The one schedule of every trainer: linear warmup over ``warmup_steps`` steps, then a cosine
    to ``min_ratio``. With a time budget (``time_fraction`` = elapsed / budget) the cosine runs
    on whichever is further along, the steps or the time (a virtual step of
    ``time_fraction * max_steps``), so a time-bounded run still decays fully within its budget;
    the warmup always counts real steps (it is about how many updates the model has seen)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    virtual = float(step) if time_fraction is None else max(step, time_fraction * max_steps)
    return warmup_cosine_factor(virtual, warmup_steps, max_steps, min_ratio)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio))


def progress_bar(total: Optional[int], desc: str = "", enabled: bool = True, initial: int = 0,
                 file=None) -> Any:
    """A tqdm bar on stderr: redrawn in place on a terminal, a plain line at most every 10 s
    otherwise (logs, CI)."""
    from tqdm import tqdm
    file = file or sys.stderr
    tty = hasattr(file, "isatty") and file.isatty()
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, file=file,
                mininterval=0.2 if tty else 10.0, dynamic_ncols=tty, ascii=not tty)
