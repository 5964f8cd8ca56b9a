"""MLM pretraining of the BERT supernet: sandwich training, AdamW with warmup, atomic
checkpoints and --resume, DDP through torchrun.

Each step draws one batch, masks it (15%, 80/10/10), and runs the largest, the smallest and one
random architecture on it (sandwich), summing their gradients before one AdamW step. The
architectures and the data order depend only on the seed and the step, so every DDP rank uses
the same architecture and a resumed run continues exactly where the killed one stopped.

The learning rate warms up linearly and then follows a cosine to zero at ``steps``. With
``max_minutes`` the schedule also runs on wall-clock time: progress is the larger of
step / steps and elapsed / max_minutes, so a time-limited run still ends with a decayed rate
(the elapsed time is shared by all ranks and carried through checkpoints).
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch
import torch.distributed as dist

from mos_models.common import (MixedPrecision, ProgressBar, arch_rng, cleanup_distributed,
                               fused_adam_options, init_distributed, load_training_state,
                               sample_archs, sandwich_step, save_training_state, set_backend,
                               warmup_cosine_factor, wrap_ddp)
from mos_models.common.checkpoint import latest_checkpoint, load_checkpoint
from mos_models.common.training import barrier
from .data import load_blocks, load_meta, mask_tokens, unigram_perplexity
from .model import BertSupernet, perplexity
from .space import PRESETS, get_space, space_from_dict

VALID_MASK_SEED = 1234


@dataclass
class RunConfig:
    data: str
    preset: str = "tiny"
    space: str = "supershaper"
    supernet: str = "neuron"
    num_experts: int = 2
    router_hidden: int = 128
    sampling: str = "sandwich"
    pre_norm: bool = False    # LN before each sub-block (and a final LN) instead of BERT's after
    seq_len: int = 0          # 0: the preset's
    batch_size: int = 0       # per process; 0: the preset's
    lr: float = 0.0           # 0: the preset's
    weight_decay: float = -1  # < 0: the preset's
    warmup_steps: int = -1    # < 0: the preset's
    steps: int = 0            # 0: the preset's
    dropout: float = -1       # < 0: the preset's
    max_minutes: Optional[float] = None
    seed: int = 0
    backend: str = "auto"
    save_mixed_weight: bool = False  # MoSLinear keeps W_a for the backward (memory for time)
    amp: str = "off"          # off | bf16 | fp16: mixed precision (GPUs)
    checkpoint_minutes: float = 2.0
    vocab_size: int = 0       # filled from the data
    space_def: Dict = field(default_factory=dict)  # filled: the space's to_dict()

    def resolve(self) -> "RunConfig":
        p = PRESETS[self.preset]
        for name in ("seq_len", "batch_size", "lr", "steps"):
            if not getattr(self, name):
                setattr(self, name, getattr(p, name))
        for name in ("weight_decay", "warmup_steps", "dropout"):
            if getattr(self, name) < 0:
                setattr(self, name, getattr(p, name))
        if not self.vocab_size:
            self.vocab_size = load_meta(self.data)["vocab_size"]
        if not self.space_def:
            self.space_def = get_space(self.space, self.preset).to_dict()
        return self


def build_supernet(cfg: RunConfig) -> BertSupernet:
    model = BertSupernet(space_from_dict(cfg.space_def), cfg.vocab_size, cfg.seq_len,
                         supernet=cfg.supernet, num_experts=cfg.num_experts,
                         router_hidden=cfg.router_hidden, dropout=cfg.dropout,
                         backend=cfg.backend, pre_norm=cfg.pre_norm)
    return set_backend(model, cfg.backend, cfg.save_mixed_weight)


def load_run(run_dir: str, device="cpu"):
    """(supernet with the latest checkpoint's weights, RunConfig, step) of a training run."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run's --out?")
    with open(path) as f:
        cfg = RunConfig(**json.load(f))
    model = build_supernet(cfg).to(device)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint_<step>.pt in {run_dir}")
    state = load_checkpoint(ckpt, map_location=device)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state["step"]


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith("bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                             betas=(0.9, 0.98), eps=1e-6, **fused_adam_options(decay + no_decay))


def batch_indices(step: int, num_blocks: int, batch_size: int, rank: int, world: int,
                  seed: int) -> torch.Tensor:
    """Block indices of this rank's batch at ``step``: one seeded permutation per epoch, each
    global batch split across the ranks."""
    per_epoch = num_blocks // (batch_size * world)
    if per_epoch == 0:
        raise ValueError(f"train: {num_blocks} training blocks are fewer than one global batch "
                         f"of {batch_size * world}; lower --batch-size or --seq-len")
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_blocks, generator=g)
    start = (i * world + rank) * batch_size
    return perm[start:start + batch_size]


def masked_valid(data_dir: str, seq_len: int, vocab_size: int, max_blocks: Optional[int] = None):
    """The valid split's blocks with fixed masks (the same every evaluation)."""
    blocks = load_blocks(data_dir, "valid", seq_len)
    if max_blocks:
        blocks = blocks[:max_blocks]
    g = torch.Generator().manual_seed(VALID_MASK_SEED)
    return mask_tokens(blocks, vocab_size, g)


@torch.no_grad()
def mlm_perplexity(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 64,
                   device="cpu") -> float:
    """exp(mean cross-entropy over the masked positions) of ``model`` (eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        total += float(model(x, y, reduction="sum"))
        count += int((y != -100).sum())
    model.train(was_training)
    return perplexity(total, count)


def unigram_baseline(data_dir: str, labels: torch.Tensor, vocab_size: int) -> float:
    train_stream = torch.load(os.path.join(data_dir, "train.pt"))
    return unigram_perplexity(train_stream, labels[labels != -100], vocab_size)


def _shared_elapsed(elapsed: float, info) -> float:
    """Rank 0's clock, on every rank, so all ranks agree on the rate and on when to stop."""
    if not info.enabled:
        return elapsed
    t = torch.tensor([elapsed], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def train(cfg: RunConfig, out_dir: str, resume: bool = False, device: Optional[str] = None,
          log=print, stop_at: Optional[int] = None) -> Dict:
    """Trains (or resumes) a supernet into ``out_dir``; returns the final metrics.
    ``stop_at``: stop (and checkpoint) after that step as if killed there (for tests)."""
    info = init_distributed(device)
    try:
        return _train(cfg.resolve(), out_dir, resume, info, log, stop_at)
    finally:
        cleanup_distributed()


def _train(cfg: RunConfig, out_dir: str, resume: bool, info, log, stop_at=None) -> Dict:
    dev = info.device
    config_path = os.path.join(out_dir, "config.json")
    if resume and os.path.exists(config_path):
        with open(config_path) as f:
            saved = json.load(f)
        # the run's architecture settings win; max_minutes and checkpointing may change
        keep = {k: getattr(cfg, k)
                for k in ("max_minutes", "checkpoint_minutes", "backend", "save_mixed_weight",
                          "amp")}
        cfg = RunConfig(**{**saved, **keep})
    elif not resume and latest_checkpoint(out_dir) is not None:
        raise FileExistsError(f"{out_dir} already holds checkpoints; pass --resume to continue "
                              "or choose another --out")
    torch.manual_seed(cfg.seed)
    model = build_supernet(cfg).to(dev)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    precision = MixedPrecision(cfg.amp, torch.device(dev).type)
    step, elapsed = 0, 0.0
    if resume:
        state = load_training_state(out_dir, model, optimizer, map_location=dev)
        if state is not None:
            step, elapsed = state["step"], state["extra"].get("elapsed", 0.0)
            if "scaler" in state["extra"]:
                precision.scaler.load_state_dict(state["extra"]["scaler"])
            if info.is_main:
                log(f"resumed from {state['path']} at step {step} ({elapsed / 60:.1f} min)")
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(config_path, "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    ddp = wrap_ddp(model, info)
    space = model.space
    blocks = load_blocks(cfg.data, "train", cfg.seq_len)
    budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
    if info.is_main:
        params = sum(p.numel() for p in model.parameters())
        log(f"{space.name} space ({cfg.preset}), {cfg.supernet} supernet, {params:,} parameters,"
            f" {blocks.shape[0]} train blocks of {cfg.seq_len}, batch {cfg.batch_size} x "
            f"{info.world_size} process(es), {cfg.sampling} sampling, device {dev}")

    def loss_fn(net, arch):
        return net(inputs, labels)

    bar = ProgressBar(cfg.steps, "train", enabled=info.is_main, initial=step)
    start, saved_at, first = time.monotonic() - elapsed, elapsed, step
    model.train()
    while step < (cfg.steps if stop_at is None else min(stop_at, cfg.steps)):
        # every decision below uses rank 0's clock, so all ranks take the same branches
        elapsed = _shared_elapsed(time.monotonic() - start, info)
        if budget is not None and elapsed >= budget:
            break
        if step > first and elapsed - saved_at >= 60 * cfg.checkpoint_minutes:
            _save(out_dir, step, model, optimizer, elapsed, info, precision)
            saved_at = elapsed
        virtual = step if budget is None else max(step, int(cfg.steps * elapsed / budget))
        lr = cfg.lr * warmup_cosine_factor(virtual, cfg.warmup_steps, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(step, blocks.shape[0], cfg.batch_size, info.rank, info.world_size,
                            cfg.seed)
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + info.rank)
        inputs, labels = mask_tokens(blocks[idx], cfg.vocab_size, g)
        inputs, labels = inputs.to(dev), labels.to(dev)
        archs = sample_archs(space, arch_rng(cfg.seed, step), cfg.sampling)
        optimizer.zero_grad(set_to_none=True)
        losses = sandwich_step(ddp, archs, loss_fn, precision)
        precision.step(optimizer, model.parameters(), 1.0)
        step += 1
        bar.update(1, loss=sum(losses) / len(losses), big=losses[0], lr=lr)
    bar.close()
    elapsed = _shared_elapsed(time.monotonic() - start, info)
    _save(out_dir, step, model, optimizer, elapsed, info, precision)
    metrics = {}
    if info.is_main:
        metrics = final_metrics(model, cfg, dev)
        metrics.update(step=step, minutes=elapsed / 60)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        log(json.dumps(metrics))
    barrier(info)
    return metrics


def _save(out_dir, step, model, optimizer, elapsed, info, precision) -> None:
    if info.is_main:
        save_training_state(out_dir, step, model, optimizer,
                            extra={"elapsed": elapsed, "scaler": precision.scaler.state_dict()})
    barrier(info)


def final_metrics(model: BertSupernet, cfg: RunConfig, device="cpu") -> Dict:
    inputs, labels = masked_valid(cfg.data, cfg.seq_len, cfg.vocab_size)
    space = model.space
    out = {"unigram_perplexity": unigram_baseline(cfg.data, labels, cfg.vocab_size),
           "masked_tokens": int((labels != -100).sum())}
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        model.set_arch(arch)
        out[f"perplexity_{name}"] = mlm_perplexity(model, inputs, labels, device=device)
        out[f"params_{name}"] = model.param_count()
    return out
