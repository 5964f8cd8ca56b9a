"""Supernet training: sandwich or SPOS sampling, label-smoothed cross-entropy, Adam with warmup
and cosine decay, gradient clipping, atomic checkpoints with --resume, DDP through torchrun.

The run directory holds ``run.json`` (model hyper-parameters, preset, data directory),
``checkpoint_<step>.pt`` (the newest two) and ``log.jsonl`` (one line per logged step).

With ``max_minutes`` the learning-rate schedule follows whichever is further along, the steps or
the training time, so a time-bounded run still warms up and decays fully within its budget.
"""
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..common import checkpoint as ckpt
from ..common.elastic import set_backend
from ..common.training import (DistInfo, MixedPrecision, ProgressBar, all_reduce_mean, arch_rng,
                               barrier, fused_adam_options, init_distributed, sample_archs,
                               sandwich_step, unwrap, warmup_cosine_factor, wrap_ddp)
from .config import PRESETS
from .data import (Tokenizer, collate, detect_lang, epoch_batches, load_split, make_batches,
                   train_sentencepiece)
from .model import MTSupernet, StaticTransformer, Transformer, build_model, loss_fn


@dataclass
class TrainArgs:
    data: str
    out: str
    preset: str = "tiny"
    supernet: str = "neuron"            # neuron | layer | standard
    sampling: str = "sandwich"          # sandwich | spos (a static model always trains alone)
    max_minutes: Optional[float] = None
    max_steps: Optional[int] = None      # default: the preset's
    max_tokens: Optional[int] = None     # per batch and process; default: the preset's
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    seed: int = 1
    resume: bool = False
    backend: str = "auto"
    save_mixed_weight: bool = False     # MoSLinear keeps W_a for the backward (memory for time)
    device: Optional[str] = None
    amp: str = "off"                    # off | bf16 | fp16 (mixed precision on GPUs)
    num_experts: int = 2
    router_hidden: int = 128
    save_every: int = 200               # steps between checkpoints (also on exit)
    log_every: int = 20
    from_model: Optional[str] = None     # an exported static model to train further
    progress: bool = True


def _settings(args: TrainArgs) -> Dict:
    preset = PRESETS[args.preset]
    return {"max_steps": args.max_steps or preset.max_steps,
            "max_tokens": args.max_tokens or preset.max_tokens,
            "lr": args.lr or preset.lr,
            "warmup_steps": preset.warmup_steps if args.warmup_steps is None
            else args.warmup_steps,
            "min_lr_ratio": preset.min_lr_ratio, "label_smoothing": preset.label_smoothing,
            "clip_norm": preset.clip_norm}


def _build(args: TrainArgs, vocab_size: int) -> Transformer:
    if args.from_model:
        from .export import load_static
        return load_static(args.from_model)
    model = MTSupernet(vocab_size, PRESETS[args.preset].space, args.supernet, args.num_experts,
                       args.router_hidden, args.backend)
    return set_backend(model, args.backend, args.save_mixed_weight)


def tokenizer_for(data_dir, preset: str = "tiny") -> Tokenizer:
    """The data directory's spm.model, trained first when it is missing."""
    path = Path(data_dir) / "spm.model"
    if not path.exists():
        train_sentencepiece(data_dir, detect_lang(data_dir), PRESETS[preset].vocab_size)
    return Tokenizer(path)


@torch.no_grad()
def evaluate_loss(model: Transformer, batches: List[List[int]], src, tgt, device,
                  arch=None) -> float:
    """Mean per-token cross-entropy (no smoothing) of ``arch`` over the batches."""
    was_training = model.training
    model.eval()
    if arch is not None:
        model.set_arch(arch)
    total, tokens = 0.0, 0
    for indices in batches:
        s, t_in, t_out = collate(indices, src, tgt, device)
        total += float(loss_fn(model(s, t_in), t_out, reduction="sum"))
        tokens += int(t_out.ne(0).sum())
    model.train(was_training)
    return total / max(tokens, 1)


def train(args: TrainArgs, log=print) -> Dict:
    info: DistInfo = init_distributed(args.device)
    out = Path(args.out)
    settings = _settings(args)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    # an exported model brings its own vocabulary; a data directory without one gets it trained
    spm_path = Path(args.from_model or args.data) / "spm.model"
    if info.is_main and not args.from_model:
        tokenizer_for(args.data, args.preset)
    barrier(info)
    tokenizer = Tokenizer(spm_path)
    lang = detect_lang(args.data)
    src, tgt, _ = load_split(args.data, "train", tokenizer, lang)
    valid_src, valid_tgt, _ = load_split(args.data, "valid", tokenizer, lang)
    batches = make_batches(src, tgt, settings["max_tokens"])
    valid_batches = make_batches(valid_src, valid_tgt, settings["max_tokens"])

    torch.manual_seed(args.seed)
    model = _build(args, len(tokenizer)).to(info.device)
    static = isinstance(model, StaticTransformer)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"], betas=(0.9, 0.98),
                                 eps=1e-8, **fused_adam_options(model.parameters()))
    precision = MixedPrecision(args.amp, torch.device(info.device).type)
    step, epoch, position, seconds = 0, 0, 0, 0.0
    if args.resume:
        state = ckpt.load_training_state(out, model, optimizer, map_location=info.device)
        if state is not None:
            step, extra = state["step"], state["extra"]
            epoch, position, seconds = extra["epoch"], extra["position"], extra["seconds"]
            if "scaler" in extra:
                precision.scaler.load_state_dict(extra["scaler"])
            if info.is_main:
                log(f"resumed from {state['path']} at step {step} ({seconds:.0f}s trained)")
    if info.is_main:
        run = {"model": model.hparams(), "preset": args.preset, "data": str(Path(args.data)),
               "lang": lang, "spm": str(spm_path), "settings": settings,
               "args": asdict(args), "world_size": info.world_size}
        ckpt.save_checkpoint(run, out / "run.pt")
        with open(out / "run.json", "w") as f:
            json.dump(run, f, indent=1, default=str)
        shutil.copy(spm_path, out / "spm.model")
    ddp = wrap_ddp(model, info)
    model.train()

    max_seconds = None if args.max_minutes is None else args.max_minutes * 60
    mode = "static" if static else args.sampling
    bar = ProgressBar(settings["max_steps"], f"train {mode}", enabled=args.progress and
                      info.is_main, initial=step)
    log_file = open(out / "log.jsonl", "a") if info.is_main else None
    order = epoch_batches(batches, args.seed, epoch, info.rank, info.world_size)
    if not order:
        raise ValueError(f"train: {len(batches)} batches cannot be shared by "
                         f"{info.world_size} processes; lower --max-tokens")
    last_save, start, stop = step, time.monotonic(), False

    def save():
        if info.is_main:
            ckpt.save_training_state(out, step, model, optimizer, extra={
                "epoch": epoch, "position": position, "seconds": seconds,
                "scaler": precision.scaler.state_dict()})

    while not stop:
        elapsed = all_reduce_mean(seconds + time.monotonic() - start, info)  # ranks agree
        progress = step / settings["max_steps"]
        if max_seconds is not None:
            progress = max(progress, elapsed / max_seconds)
        if progress >= 1.0:
            break
        factor = warmup_cosine_factor(step, settings["warmup_steps"], settings["max_steps"],
                                      settings["min_lr_ratio"])
        if max_seconds is not None and step >= settings["warmup_steps"]:
            factor = settings["min_lr_ratio"] + (1 - settings["min_lr_ratio"]) * 0.5 * (
                1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = settings["lr"] * factor

        if position >= len(order):
            epoch, position = epoch + 1, 0
            order = epoch_batches(batches, args.seed, epoch, info.rank, info.world_size)
        s, t_in, t_out = collate(order[position], src, tgt, info.device)
        torch.manual_seed((args.seed * 1_000_003 + step) * 64 + info.rank)  # dropout: resumable
        archs = [None] if static else sample_archs(unwrap(ddp).space,
                                                   arch_rng(args.seed, step), args.sampling)
        optimizer.zero_grad(set_to_none=True)
        losses = sandwich_step(ddp, archs, lambda m, arch: loss_fn(
            m(s, t_in), t_out, settings["label_smoothing"]), precision)
        grad_norm = precision.step(optimizer, model.parameters(), settings["clip_norm"])
        step, position = step + 1, position + 1
        bar.update(1, loss=losses[0], lr=settings["lr"] * factor)
        if info.is_main and step % args.log_every == 0:
            log_file.write(json.dumps({"step": step, "epoch": epoch, "losses": losses,
                                       "lr": settings["lr"] * factor,
                                       "grad_norm": float(grad_norm),
                                       "seconds": seconds + time.monotonic() - start}) + "\n")
            log_file.flush()
        if step - last_save >= args.save_every:
            seconds += time.monotonic() - start
            start = time.monotonic()
            save()
            last_save = step
    seconds += time.monotonic() - start
    save()
    bar.close()
    result = {"step": step, "epoch": epoch, "seconds": seconds}  # and "model", at the end
    if info.is_main:
        valid = valid_batches
        if static:
            result["valid_loss"] = evaluate_loss(model, valid, valid_src, valid_tgt, info.device)
        else:
            space = model.space
            for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
                result[f"valid_loss_{name}"] = evaluate_loss(model, valid, valid_src, valid_tgt,
                                                             info.device, arch)
        log_file.write(json.dumps({"final": result}) + "\n")
        log_file.close()
        log(f"trained {step} steps in {seconds / 60:.1f} min: " +
            ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k.startswith("valid")))
    barrier(info)
    result["model"] = model
    return result


def load_run(run_dir, device="cpu"):
    """(model with the newest checkpoint's weights, run metadata) of a training run."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.pt").exists():
        raise FileNotFoundError(f"{run_dir} is not a training run (no run.pt)")
    run = ckpt.load_checkpoint(run_dir / "run.pt")
    model = build_model(run["model"])
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint_<step>.pt")
    model.load_state_dict(ckpt.load_checkpoint(path, device)["model"])
    return model.to(device).eval(), run
