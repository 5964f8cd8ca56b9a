"""MLM pretraining of the BERT supernet with the shared training core.

Each step draws one batch of packed blocks, masks it (15%, 80/10/10) and runs the step's
architectures on it (sandwich: largest, smallest, one random), summing their gradients before
one AdamW step. ``BertTask`` supplies the model, the batches and the loss; sampling, the
schedule, checkpoints, --resume, DDP, --compile and the run directory are
``mos_models.common.trainer``'s. Also here: ``load_run``/``export_run`` of BERT runs and the
validation perplexity that training, evaluation and search report.
"""
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..common import trainer
from ..common.run import Run, load_run as _load_run
from ..common.trainer import Task, TrainConfig, fill_none
from ..common.training import batch_indices, fused_adam_options, step_seed
from .data import load_blocks, load_meta, mask_tokens, unigram_perplexity
from .export import save_exported
from .model import BertMLM, BertSupernet, build_model, perplexity, static_hparams
from .space import PRESETS, get_space, space_from_dict

VALID_MASK_SEED = 1234


@dataclass
class BertConfig:
    """What a BERT run trains (the trainer's own settings are in TrainConfig). None: the
    preset's (or, for vocab_size and space_def, the data's and the space's)."""
    data: str
    preset: str = "tiny"
    space: str = "supershaper"
    supernet: str = "neuron"
    num_experts: int = 2
    router_hidden: int = 128
    pre_norm: bool = False    # LN before each sub-block (and a final LN) instead of BERT's after
    seq_len: Optional[int] = None
    batch_size: Optional[int] = None   # per process
    weight_decay: Optional[float] = None
    dropout: Optional[float] = None
    vocab_size: Optional[int] = None
    space_def: Optional[Dict] = None   # the space's to_dict()
    arch: Optional[Dict] = None        # an architecture of the space, trained alone from scratch
                                       # (a static BertMLM; the study's standalone)


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, no weight decay on biases and LayerNorm/1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith("bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                             betas=(0.9, 0.98), eps=1e-6, **fused_adam_options(decay + no_decay))


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
    train_stream = torch.load(os.path.join(data_dir, "train.pt"), weights_only=True)
    return unigram_perplexity(train_stream, labels[labels != -100], vocab_size)


def final_metrics(model: BertSupernet, cfg: BertConfig, device="cpu") -> Dict:
    inputs, labels = masked_valid(cfg.data, cfg.seq_len, cfg.vocab_size)
    space = model.space
    out = {"unigram_perplexity": unigram_baseline(cfg.data, labels, cfg.vocab_size),
           "masked_tokens": int((labels != -100).sum())}
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        model.set_arch(arch)
        out[f"perplexity_{name}"] = mlm_perplexity(model, inputs, labels, device=device)
        out[f"params_{name}"] = model.param_count()
    return out


class BertTask(Task):
    name = "bert"
    config_class = BertConfig
    model_from_config = staticmethod(build_model)

    def __init__(self, config: BertConfig):
        if config.preset not in PRESETS:
            raise ValueError(f"bert: preset must be one of {sorted(PRESETS)}, "
                             f"got {config.preset!r}")
        self.preset = p = PRESETS[config.preset]
        config = fill_none(config, {"seq_len": p.seq_len, "batch_size": p.batch_size,
                                    "weight_decay": p.weight_decay, "dropout": p.dropout})
        if config.vocab_size is None:
            config = fill_none(config, {"vocab_size": load_meta(config.data)["vocab_size"]})
        if config.space_def is None:
            config = fill_none(config, {"space_def":
                                        get_space(config.space, config.preset).to_dict()})
        self.space = space_from_dict(config.space_def)
        if config.arch is not None:
            config = replace(config, arch=self.space.parse(config.arch))
        super().__init__(config)

    def train_defaults(self) -> Dict:
        p = self.preset
        return {"max_steps": p.steps, "lr": p.lr, "warmup_steps": p.warmup_steps,
                "min_lr_ratio": 0.0, "clip_norm": 1.0}

    def setup(self, info, cfg: TrainConfig, log) -> None:
        self.blocks = load_blocks(self.config.data, "train", self.config.seq_len)
        self.seed, self.info = cfg.seed, info

    def build_model(self) -> BertMLM:
        c = self.config
        if c.arch is not None:
            return BertMLM.static(c.vocab_size, c.seq_len, self.space.layout(c.arch),
                                  self.space.bottleneck, c.dropout, c.pre_norm)
        return self.model_from_config({"space": c.space_def, "vocab_size": c.vocab_size,
                               "max_len": c.seq_len, "supernet": c.supernet,
                               "num_experts": c.num_experts, "router_hidden": c.router_hidden,
                               "dropout": c.dropout, "pre_norm": c.pre_norm})

    def model_config(self, model: BertMLM) -> Dict:
        if self.config.arch is None:
            return model.hparams()
        return static_hparams(model, self.space.layout(self.config.arch), self.space.bottleneck)

    def optimizer(self, model, lr: float) -> torch.optim.Optimizer:
        return make_optimizer(model, lr, self.config.weight_decay)

    def batch(self, step: int):
        c, info = self.config, self.info
        idx = batch_indices(step, self.blocks.shape[0], c.batch_size, info.rank,
                            info.world_size, self.seed)
        g = torch.Generator().manual_seed(step_seed(self.seed, step, info.rank))
        inputs, labels = mask_tokens(self.blocks[idx], c.vocab_size, g)
        return inputs.to(info.device), labels.to(info.device)

    def loss(self, model, batch, arch, shared) -> torch.Tensor:
        return model(*batch)

    def evaluate(self, model: BertMLM) -> Dict[str, float]:
        if self.config.arch is None:
            return final_metrics(model, self.config, self.info.device)
        c = self.config
        inputs, labels = masked_valid(c.data, c.seq_len, c.vocab_size)
        return {"perplexity": mlm_perplexity(model, inputs, labels, device=self.info.device),
                "params": sum(p.numel() for p in model.parameters())}

    def run_files(self) -> Dict[str, str]:
        spm = Path(self.config.data) / "spm.model"
        return {"spm.model": str(spm)} if spm.exists() else {}

    def describe(self, model) -> str:
        c = self.config
        what = (f"{c.supernet} supernet" if c.arch is None
                else f"static model from scratch, layers {self.space.layout(c.arch).layers}")
        return (f"{self.space.name} space ({c.preset}), {what}, "
                f"{self.blocks.shape[0]} train blocks of {c.seq_len}, batch {c.batch_size} per "
                "process")


def train(config: BertConfig, cfg: TrainConfig, log=print) -> Dict:
    """Trains (or resumes) a BERT run into ``cfg.out``; see mos_models.common.trainer.train."""
    return trainer.train(BertTask(config), cfg, log)


def load_run(run_dir: str, device="cpu", log=print) -> Tuple[BertMLM, Run]:
    """(model with the newest loadable checkpoint's weights, in eval mode, Run) of a BERT run:
    a BertSupernet, or a static BertMLM for a run of one architecture (``BertConfig.arch``);
    ``Run.task_config`` is its BertConfig (data, seq_len, vocab_size...)."""
    return _load_run(run_dir, BertTask, device, log)


def export_run(run_dir: str, arch_spec, out_dir: str, device="cpu", log=print) -> Dict:
    """Exports architecture ``arch_spec`` (see GeneSpace.parse) of a run as a static BERT;
    returns the export's config.json."""
    supernet, run = load_run(run_dir, device, log)
    if not isinstance(supernet, BertSupernet):
        raise ValueError(f"export: {run_dir} holds a static model, not a supernet")
    cfg = run.task_config
    arch = supernet.space.parse(arch_spec)
    model = supernet.export(arch)
    spm = run.dir / "spm.model"
    tokenizer = str(spm if spm.exists() else Path(cfg.data) / "spm.model")
    source = {"run": os.path.abspath(run_dir), "step": run.step, "arch": arch,
              "space": supernet.space.name, "supernet": cfg.supernet}
    return save_exported(model, out_dir, supernet.layout(), supernet.space.bottleneck,
                         tokenizer=tokenizer, extra={"source": source})
