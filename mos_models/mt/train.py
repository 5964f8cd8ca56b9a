"""Training the MT supernet (or an exported static model further) with the shared training core.

``MTTask`` is what the core needs: the model, each step's batch (token-bucketed sentence pairs,
shuffled per epoch from the seed) and the label-smoothed cross-entropy. Everything else
(sampling, schedule, checkpoints, --resume, DDP, --compile, the run directory) is
``mos_models.common.trainer``'s. Also here: ``load_run`` and ``export_run`` of MT runs, and the
validation loss that training and search report.
"""
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..common import trainer
from ..common.run import Run, load_run as _load_run
from ..common.trainer import Task, TrainConfig, fill_none
from .config import PRESETS, MTSpace, describe
from .data import (Tokenizer, collate, detect_lang, epoch_batches, load_split, make_batches,
                   train_sentencepiece)
from .export import load_static, save_static
from .model import MTSupernet, StaticTransformer, Transformer, build_model, loss_fn


@dataclass
class MTConfig:
    """What an MT run trains (the trainer's own settings are in TrainConfig)."""
    data: str
    preset: str = "tiny"
    supernet: str = "neuron"            # neuron | layer | standard
    max_tokens: Optional[int] = None    # per batch and process; None: the preset's
    num_experts: int = 2
    router_hidden: int = 128
    from_model: Optional[str] = None    # an exported static model to train further
    arch: Optional[Dict] = None         # an architecture of the preset's space, trained alone
                                        # from scratch (a static model; the study's standalone)


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


class MTTask(Task):
    name = "mt"
    config_class = MTConfig
    model_from_config = staticmethod(build_model)

    def __init__(self, config: MTConfig):
        if config.preset not in PRESETS:
            raise ValueError(f"mt: preset must be one of {sorted(PRESETS)}, got {config.preset!r}")
        self.preset = PRESETS[config.preset]
        if config.arch is not None:
            if config.from_model:
                raise ValueError("mt: give either arch (train from scratch) or from_model "
                                 "(train an export further), not both")
            config = replace(config, arch=MTSpace(self.preset.space).parse(config.arch))
        super().__init__(fill_none(config, {"max_tokens": self.preset.max_tokens}))
        # an exported model brings its own vocabulary; a data directory gets one if it lacks it
        self.spm = Path(config.from_model or config.data) / "spm.model"

    def train_defaults(self) -> Dict:
        p = self.preset
        return {"max_steps": p.max_steps, "lr": p.lr, "warmup_steps": p.warmup_steps,
                "min_lr_ratio": p.min_lr_ratio, "clip_norm": p.clip_norm}

    def prepare(self, log) -> None:
        if not self.config.from_model:
            tokenizer_for(self.config.data, self.config.preset)

    def setup(self, info, cfg: TrainConfig, log) -> None:
        self.tokenizer = Tokenizer(self.spm)
        self.lang = detect_lang(self.config.data)
        self.src, self.tgt, _ = load_split(self.config.data, "train", self.tokenizer, self.lang)
        self.valid = load_split(self.config.data, "valid", self.tokenizer, self.lang)[:2]
        self.batches = make_batches(self.src, self.tgt, self.config.max_tokens)
        self.seed, self.rank, self.world, self.device = (cfg.seed, info.rank, info.world_size,
                                                         info.device)
        self.per_rank = len(self.batches) // info.world_size
        if self.per_rank == 0:
            raise ValueError(f"train: {len(self.batches)} batches cannot be shared by "
                             f"{info.world_size} processes; lower --max-tokens")
        self._order: Tuple[int, list] = (-1, [])

    def build_model(self) -> Transformer:
        c = self.config
        if c.from_model:
            return load_static(c.from_model)
        if c.arch is not None:
            return StaticTransformer.from_scratch(len(self.tokenizer), c.arch, self.preset.space)
        return MTSupernet(len(self.tokenizer), self.preset.space, c.supernet, c.num_experts,
                          c.router_hidden)

    def batch(self, step: int):
        epoch, position = divmod(step, self.per_rank)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_batches(self.batches, self.seed, epoch, self.rank,
                                                self.world))
        return collate(self._order[1][position], self.src, self.tgt, self.device)

    def loss(self, model, batch, arch, shared) -> torch.Tensor:
        s, t_in, t_out = batch
        return loss_fn(model(s, t_in), t_out, self.preset.label_smoothing)

    def evaluate(self, model: Transformer) -> Dict[str, float]:
        batches = make_batches(*self.valid, self.config.max_tokens)
        if isinstance(model, StaticTransformer):
            return {"valid_loss": evaluate_loss(model, batches, *self.valid, self.device)}
        return {f"valid_loss_{name}": evaluate_loss(model, batches, *self.valid, self.device,
                                                    arch)
                for name, arch in (("largest", model.space.largest()),
                                   ("smallest", model.space.smallest()))}

    def run_files(self) -> Dict[str, str]:
        return {"spm.model": str(self.spm)}

    def describe(self, model) -> str:
        c = self.config
        if c.from_model:
            what = f"static model from {c.from_model}"
        elif c.arch is not None:
            what = f"static model from scratch, {describe(c.arch)}"
        else:
            what = f"{c.supernet} supernet"
        return (f"{self.config.preset} preset, {what}, {len(self.batches)} batches of <= "
                f"{self.config.max_tokens} tokens")


def train(config: MTConfig, cfg: TrainConfig, log=print) -> Dict:
    """Trains (or resumes) an MT run into ``cfg.out``; see ``mos_models.common.trainer.train``."""
    return trainer.train(MTTask(config), cfg, log)


def load_run(run_dir, device="cpu", log=print) -> Tuple[Transformer, Run]:
    """(model with the newest loadable checkpoint's weights, in eval mode, Run) of an MT run;
    ``Run.task_config`` is its MTConfig (data, preset, max_tokens...)."""
    return _load_run(run_dir, MTTask, device, log)


def export_run(run_dir, arch_spec, out_dir, log=print) -> Path:
    """Exports architecture ``arch_spec`` (see GeneSpace.parse) of a run as a static model."""
    model, run = load_run(run_dir, log=log)
    if not isinstance(model, MTSupernet):
        raise ValueError(f"export: {run_dir} holds a static model, not a supernet")
    arch = model.space.parse(arch_spec)
    source = {"run": str(Path(run_dir).resolve()), "step": run.step, "arch": arch,
              "description": describe(arch), "supernet": model.kind}
    return save_static(model.export(arch), out_dir, run.dir / "spm.model", log, source)
