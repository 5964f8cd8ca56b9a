"""The training core every supernet (and static model) of mos_models trains with.

A ``Task`` says what is trained: it builds the model, yields this rank's batch of each step and
computes the loss of one architecture on it (and, at the end, its metrics). ``train(task, cfg)``
owns everything else: architecture sampling (sandwich or SPOS), the step and time budgets, the
learning-rate schedule, one clock shared by all ranks, seeds, mixed precision, torch.compile,
DDP, checkpoints and ``--resume``, the run directory (see run.py), log.jsonl and the progress
bar. A run is deterministic in (task config, seed): the same command gives the same batches,
architectures, dropout masks and so weights, and a resumed run continues bit for bit where the
killed one stopped (except under --compile, whose kernels may round differently).
"""
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import (latest_checkpoint, load_training_state, save_training_state,
                         set_aside_newer)
from .compile import compile_model, compile_stats
from .distributed import (DistInfo, barrier, cleanup_distributed, init_distributed,
                          shared_clock, wrap_ddp)
from .elastic import set_backend
from .run import RUN_FORMAT, read_run_config, write_json
from .training import (SAMPLING, MixedPrecision, arch_rng, fused_adam_options, lr_factor,
                       progress_bar, sample_archs, sandwich_step, step_seed)

Log = Callable[[str], None]


@dataclass
class TrainConfig:
    """The trainer's settings. None: the task's default (its preset's), filled by ``train``."""
    out: str
    seed: int = 0
    sampling: str = "sandwich"            # sandwich | spos (a static model trains alone)
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None   # time budget; the schedule decays within it
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    min_lr_ratio: Optional[float] = None
    clip_norm: Optional[float] = None
    save_every: Optional[int] = None      # steps between checkpoints
    checkpoint_minutes: Optional[float] = None   # minutes between checkpoints
    log_every: int = 20                   # steps between log.jsonl lines
    resume: bool = False
    # runtime options: how to run, not what to train; on --resume the command line's win
    backend: str = "auto"
    strategy: str = "auto"
    save_mixed_weight: bool = False
    amp: str = "off"
    compile: bool = False
    compile_mode: Optional[str] = None    # None: "reduce-overhead" on CUDA, torch's default else
    compile_backend: str = "inductor"     # torch.compile's backend (tests: "aot_eager")
    device: Optional[str] = None
    progress: bool = True


RUNTIME = ("out", "resume", "max_minutes", "save_every", "checkpoint_minutes", "log_every",
           "backend", "strategy", "save_mixed_weight", "amp", "compile", "compile_mode",
           "compile_backend", "device", "progress")


def fill_none(config, defaults: Dict[str, Any]):
    """``config`` (a dataclass) with every field that is None taken from ``defaults``: the one
    way presets fill what the command line left open."""
    return replace(config, **{k: v for k, v in defaults.items()
                              if hasattr(config, k) and getattr(config, k) is None})


class Task:
    """What a model family gives the training core. Subclasses set ``name`` and
    ``config_class`` (a dataclass; the task is rebuilt from it on --resume) and implement
    ``build_model``, ``model_from_config``, ``batch``, ``loss`` and ``evaluate``; the rest has
    defaults.

    The model is a supernet (an nn.Module with ``space``, a GeneSpace, and ``set_arch(arch)``)
    or a static model (no ``space``: it trains alone, arch None)."""

    name = "task"
    config_class: type = None

    def __init__(self, config):
        self.config = config

    def train_defaults(self) -> Dict[str, Any]:
        """Defaults of TrainConfig's open fields (max_steps, lr, warmup_steps, min_lr_ratio,
        clip_norm...), usually the preset's."""
        return {}

    def prepare(self, log: Log) -> None:
        """Runs on rank 0 before the others start (e.g. train a missing tokenizer)."""

    def setup(self, info: DistInfo, cfg: TrainConfig, log: Log) -> None:
        """Runs on every rank before the model is built: load the data, keep rank/seed."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def model_config(self, model: nn.Module) -> Dict:
        """What config.json keeps to rebuild the model: ``model_from_config``'s argument."""
        return model.hparams()

    @staticmethod
    def model_from_config(model_config: Dict) -> nn.Module:
        """The (untrained) model of ``model_config``, for ``load_run``."""
        raise NotImplementedError

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8,
                                **fused_adam_options(model.parameters()))

    def batch(self, step: int) -> Any:
        """This rank's batch of ``step`` (on the device): a function of (seed, step, rank)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, arch, shared: Dict) -> Tensor:
        """Loss of ``arch`` (already set) on ``batch``; ``model`` may be a DDP or compiled
        wrapper. ``shared``: a dict the step's architectures share, fresh each step (in-place
        distillation keeps the largest architecture's outputs there)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Final metrics, on rank 0, model in eval mode afterwards."""
        return {}

    def run_files(self) -> Dict[str, str]:
        """Files copied into the run directory: {name: source path}."""
        return {}

    def describe(self, model: nn.Module) -> str:
        return type(model).__name__


def train(task: Task, cfg: TrainConfig, log: Log = print) -> Dict[str, Any]:
    """Trains (or, with cfg.resume, continues) ``task`` into ``cfg.out``. Returns the final
    metrics with "step", "seconds" and "model" (the trained module)."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.device)
    try:
        task, cfg = _resolve(task, cfg)
        return _Trainer(task, cfg, info, log).run()
    finally:
        if owns_group:
            cleanup_distributed()


def _resolve(task: Task, cfg: TrainConfig):
    """On --resume the run's own config.json wins, but for the runtime options."""
    out = Path(cfg.out)
    if cfg.resume and (out / "config.json").exists():
        saved = read_run_config(out, task.name)
        known = {f.name for f in fields(TrainConfig)}
        merged = {k: v for k, v in saved["train"].items() if k in known}
        merged.update({k: getattr(cfg, k) for k in RUNTIME})
        cfg = TrainConfig(**merged)
        task = type(task)(task.config_class(**saved["task_config"]))
    elif not cfg.resume and latest_checkpoint(out) is not None:
        raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue "
                              "or choose another --out")
    if cfg.sampling not in SAMPLING:
        raise ValueError(f"train: sampling must be one of {SAMPLING}, got {cfg.sampling!r}")
    defaults = {"min_lr_ratio": 0.0, "clip_norm": 1.0, **task.train_defaults()}
    cfg = fill_none(cfg, defaults)
    missing = [k for k in ("max_steps", "lr", "warmup_steps") if getattr(cfg, k) is None]
    if missing:
        raise ValueError(f"train: {', '.join(missing)} not given and the task has no default")
    return task, cfg


class _Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, info: DistInfo, log: Log):
        self.task, self.cfg, self.info = task, cfg, info
        self.log = log if info.is_main else (lambda message: None)
        self.out = Path(cfg.out)
        self.step, self.base_seconds = 0, 0.0
        self.budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes

    def run(self) -> Dict[str, Any]:
        self._setup()
        self._loop()
        return self._finish()

    # -- set-up --------------------------------------------------------------------------------
    def _setup(self) -> None:
        task, cfg, info = self.task, self.cfg, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            task.prepare(self.log)
        barrier(info)
        task.setup(info, cfg, self.log)
        torch.manual_seed(cfg.seed)
        self.model = model = task.build_model().to(info.device)
        set_backend(model, cfg.backend, cfg.save_mixed_weight, cfg.strategy)
        self.optimizer = task.optimizer(model, cfg.lr)
        self.precision = MixedPrecision(cfg.amp, info.device.type)
        if cfg.resume:
            self._restore()
        if info.is_main:
            self._write_run_config()
        self.space = getattr(model, "space", None)
        self.graphs_before = compile_stats()["compiled_graphs"]
        self.uncompile = compile_model(model, cfg.compile, cfg.compile_mode, info.device,
                                       cfg.compile_backend)
        self.forward = wrap_ddp(model, info)
        params = sum(p.numel() for p in model.parameters())
        self.log(f"{task.name}: {task.describe(model)}, {params:,} parameters; "
                 f"{info.world_size} process(es), "
                 f"{cfg.sampling if self.space is not None else 'static'} sampling, "
                 f"device {info.device}, lr {cfg.lr:g}, {cfg.max_steps} steps"
                 + (f" or {cfg.max_minutes:g} min" if cfg.max_minutes is not None else "")
                 + (", compiled" if cfg.compile else ""))

    def _restore(self) -> None:
        state = load_training_state(self.out, self.model, self.optimizer,
                                    map_location=self.info.device, log=self.log)
        if state is None:
            return
        self.step = state["step"]
        if self.info.is_main:
            set_aside_newer(self.out, self.step, self.log)
        extra = state["extra"]
        self.base_seconds = float(extra.get("seconds", 0.0))
        if extra.get("scaler"):
            self.precision.scaler.load_state_dict(extra["scaler"])
        self.log(f"resumed from {state['path']} at step {self.step} "
                 f"({self.base_seconds:.0f}s trained)")

    def _write_run_config(self) -> None:
        task = self.task
        write_json(self.out / "config.json", {
            "format": RUN_FORMAT, "task": task.name, "task_config": asdict(task.config),
            "train": asdict(self.cfg), "model": task.model_config(self.model),
            "world_size": self.info.world_size})
        for name, source in task.run_files().items():
            if Path(source).resolve() != (self.out / name).resolve():
                shutil.copyfile(source, self.out / name)

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        cfg, info = self.cfg, self.info
        self.start = time.monotonic()
        self.saved = (self.step, self.base_seconds)
        bar = progress_bar(cfg.max_steps, f"train {self.task.name}",
                           cfg.progress and info.is_main, self.step)
        log_file = open(self.out / "log.jsonl", "a") if info.is_main else None
        first = self.step
        try:
            while True:
                seconds = self._clock()
                if self._finished(seconds):
                    break
                if self.step > first and self._checkpoint_due(seconds):
                    self._save(seconds)
                record = self._train_step(seconds)
                bar.update(1)
                bar.set_postfix(loss=f"{record['losses'][0]:.4g}", lr=f"{record['lr']:.3g}")
                if log_file is not None and self.step % cfg.log_every == 0:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()

    def _clock(self) -> float:
        """Seconds trained so far (over every resume), rank 0's on every rank."""
        return shared_clock(self.base_seconds + time.monotonic() - self.start, self.info)

    def _finished(self, seconds: float) -> bool:
        if self.step >= self.cfg.max_steps:
            return True
        return self.budget is not None and seconds >= self.budget

    def _checkpoint_due(self, seconds: float) -> bool:
        cfg = self.cfg
        last_step, last_seconds = self.saved
        by_steps = cfg.save_every is not None and self.step - last_step >= cfg.save_every
        by_time = (cfg.checkpoint_minutes is not None
                   and seconds - last_seconds >= 60 * cfg.checkpoint_minutes)
        return by_steps or by_time

    def _train_step(self, seconds: float) -> Dict[str, Any]:
        cfg, task, step = self.cfg, self.task, self.step
        fraction = None if self.budget is None else seconds / self.budget
        lr = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = task.batch(step)
        torch.manual_seed(step_seed(cfg.seed, step, self.info.rank))  # dropout: resumable
        archs = sample_archs(self.space, arch_rng(cfg.seed, step), cfg.sampling)
        self.optimizer.zero_grad(set_to_none=True)
        shared: Dict = {}
        losses = sandwich_step(self.forward, archs,
                               lambda model, arch: task.loss(model, batch, arch, shared),
                               self.precision)
        grad_norm = self.precision.step(self.optimizer, self.model.parameters(), cfg.clip_norm)
        self.step += 1
        return {"step": self.step, "losses": losses, "lr": lr, "grad_norm": float(grad_norm),
                "seconds": seconds}

    def _save(self, seconds: float) -> None:
        if self.info.is_main:
            save_training_state(self.out, self.step, self.model, self.optimizer, extra={
                "seconds": float(seconds), "scaler": self.precision.scaler.state_dict()})
        self.saved = (self.step, seconds)

    # -- the end -------------------------------------------------------------------------------
    def _finish(self) -> Dict[str, Any]:
        # The DDP wrapper's reducer holds the process group: it must go before train() destroys
        # the group, or gloo's teardown can hang at exit.
        self.forward = None
        self.uncompile()
        seconds = self._clock()
        self._save(seconds)
        result: Dict[str, Any] = {"step": self.step, "seconds": seconds}
        if self.cfg.compile:
            result["compiled_graphs"] = compile_stats()["compiled_graphs"] - self.graphs_before
        if self.info.is_main:
            result.update(self.task.evaluate(self.model))
            write_json(self.out / "metrics.json", result)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps({"final": result}) + "\n")
            self.log(f"trained {self.step} steps in {seconds / 60:.1f} min: " + ", ".join(
                f"{k} {v:.4g}" for k, v in result.items()
                if isinstance(v, float) and k != "seconds"))
        barrier(self.info)
        return {**result, "model": self.model}

