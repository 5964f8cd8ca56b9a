"""Training a supernet made from a Hugging Face model, with the shared training core.

``HFTask`` gives the core (mos_models.common.trainer) the supernet (``to_supernet`` of the model
in ``--model``, neurons and layers ordered on the first training batches), each step's batch
(sentences of the text, shuffled per epoch from the seed, tokenized with the model's own
tokenizer) and the loss of one architecture: in-place distillation from a teacher plus the task
loss where there is one.

- Teacher "original" (default): the source model, frozen, run once per step without gradients;
  every sub-network, the largest included, learns to match it.
- Teacher "largest": the step's largest sub-network (the sandwich's first) teaches the others
  (its output kept, detached); it learns from the task loss alone, so this needs one (causal
  language models) and sandwich sampling.
- Distillation ("auto"): KL on the logits for models with an output head (causal LMs, masked
  LMs), 1 - cosine of the last hidden states for encoders without one (sentence encoders).
- Task loss: next-token cross-entropy for causal language models (Llama-style); none for
  encoders (no MLM loss: a sentence encoder is judged by its embeddings).

Sampling, the schedule, checkpoints, --resume, DDP, --compile and the run directory are the
core's. The run's config.json keeps the source model's path and the supernet's hparams, so
``load_run`` rebuilds it with ``from_hparams`` from the source and the checkpoint's weights.
Every ``valid_every``-th sentence of the text is held out for evaluation and search.
"""
import os
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..common import trainer
from ..common.elastic import KINDS
from ..common.run import Run, load_run as _load_run
from ..common.trainer import Task, TrainConfig
from ..common.training import batch_indices
from .corpus import default_corpus, load_texts, text_batches
from .distill import DISTILL_KINDS, distill_loss, last_hidden
from .export import load_pretrained
from .families import LLAMA, detect
from .importance import as_batch
from .metrics import perplexity, teacher_cosine
from .supernet import HFSupernet, from_hparams, to_supernet

TEACHERS = ("original", "largest")


@dataclass
class HFConfig:
    """What an hf run trains (the trainer's own settings are in TrainConfig)."""
    model: str                          # the source model's directory (stored absolute)
    data: Optional[str] = None          # a .txt file or a directory of them; None: corpus.txt
    supernet: str = "neuron"            # neuron | layer | standard
    num_experts: int = 2
    router_hidden: int = 128
    teacher: str = "original"           # original | largest
    distill: str = "auto"               # auto | kl | cosine | mse
    temperature: float = 1.0
    distill_weight: float = 1.0
    batch_size: int = 16                # sentences per step and process
    max_length: int = 64                # tokens per sentence (truncated)
    calibration_batches: int = 4        # importance ordering; 0 keeps the model's order
    valid_every: int = 5                # every N-th sentence is held out
    ffn_choices: Optional[List[int]] = None     # None: to_supernet's defaults
    layer_choices: Optional[List[int]] = None


def check_config(c: HFConfig) -> None:
    for name, value, allowed in (("supernet", c.supernet, KINDS), ("teacher", c.teacher, TEACHERS),
                                 ("distill", c.distill, DISTILL_KINDS)):
        if value not in allowed:
            raise ValueError(f"hf train: {name} must be one of {tuple(allowed)}, got {value!r}")
    for name, low in (("num_experts", 1), ("router_hidden", 1), ("batch_size", 1),
                      ("max_length", 2), ("calibration_batches", 0), ("valid_every", 2)):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"hf train: {name} must be an integer >= {low}, got {value!r}")
    if not c.temperature > 0 or not c.distill_weight >= 0:
        raise ValueError(f"hf train: temperature must be > 0 and distill_weight >= 0, got "
                         f"{c.temperature} and {c.distill_weight}")


def split_texts(texts: Sequence[str], valid_every: int) -> Tuple[List[str], List[str]]:
    """(training, held-out) sentences: every ``valid_every``-th one is held out."""
    held = [t for i, t in enumerate(texts) if i % valid_every == valid_every - 1]
    kept = [t for i, t in enumerate(texts) if i % valid_every != valid_every - 1]
    return kept, held


def run_texts(config: HFConfig) -> Tuple[List[str], List[str]]:
    texts = default_corpus() if config.data is None else load_texts(config.data)
    return split_texts(texts, config.valid_every)


def has_head(model: nn.Module) -> bool:
    """Whether the model ends in an output head (logits), e.g. LlamaForCausalLM, not BertModel."""
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


def is_causal_lm(model: nn.Module) -> bool:
    """A Llama-style model with its output head: it has a next-token loss."""
    return detect(model).family is LLAMA and has_head(model)


def distill_kind(kind: str, model: nn.Module) -> str:
    """"auto": KL on the logits when the model has an output head, else cosine."""
    if kind != "auto":
        return kind
    return "kl" if has_head(model) else "cosine"


def _detached(out, hidden: bool) -> SimpleNamespace:
    """What distill_loss reads of a teacher output, without its graph."""
    logits = getattr(out, "logits", None)
    return SimpleNamespace(logits=None if logits is None else logits.detach(),
                           last_hidden_state=last_hidden(out).detach() if hidden else None,
                           hidden_states=None)


class HFTask(Task):
    name = "hf"
    config_class = HFConfig
    model_from_config = staticmethod(from_hparams)

    def __init__(self, config: HFConfig):
        check_config(config)
        super().__init__(replace(config, model=os.path.abspath(config.model)))

    def train_defaults(self) -> Dict:
        return {"max_steps": 1000, "lr": 1e-4, "warmup_steps": 20}

    def setup(self, info, cfg: TrainConfig, log) -> None:
        c = self.config
        pre = load_pretrained(c.model, info.device)
        if pre.tokenizer is None:
            raise ValueError(f"--model {c.model!r} has no tokenizer files (tokenizer.json, "
                             "vocab.txt, ...): training tokenizes text with the model's own")
        self.found = detect(pre.model)   # an unsupported family is refused here, by name
        self.causal, self.kind = is_causal_lm(pre.model), distill_kind(c.distill, pre.model)
        if c.teacher == "largest" and (not self.causal or cfg.sampling != "sandwich"):
            raise ValueError("hf train: --teacher largest needs a task loss to train the largest "
                             "sub-network (causal language models) and --sampling sandwich; "
                             "use --teacher original")
        if not self.causal and not c.distill_weight > 0:
            raise ValueError("hf train: an encoder has no task loss here, so distill_weight "
                             f"must be > 0, got {c.distill_weight}")
        self.teacher = pre.model.eval()   # run under no_grad: no gradient reaches it
        self.tokenizer = pre.tokenizer
        self.texts, self.valid = run_texts(c)
        # a model with a head returns hidden states only when asked
        self.hidden = self.kind in ("cosine", "mse") and has_head(pre.model)
        self.seed, self.info = cfg.seed, info

    def build_model(self) -> HFSupernet:
        c = self.config
        calibration = None
        if c.calibration_batches:
            calibration = text_batches(self.tokenizer, self.texts, c.batch_size, c.max_length,
                                       c.calibration_batches)
        sn = to_supernet(self.teacher, c.num_experts, c.supernet, calibration,
                         c.router_hidden, ffn_choices=c.ffn_choices,
                         layer_choices=c.layer_choices, source_dir=c.model)
        return sn.train()   # a copy of the teacher, which is in eval mode

    def batch(self, step: int):
        c, info = self.config, self.info
        idx = batch_indices(step, len(self.texts), c.batch_size, info.rank, info.world_size,
                            self.seed)
        inputs = text_batches(self.tokenizer, [self.texts[i] for i in idx.tolist()],
                              len(idx), c.max_length)[0]
        inputs = as_batch(inputs, info.device)
        labels = None
        if self.causal:   # padding is not predicted
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return inputs, labels

    def loss(self, model, batch, arch, shared) -> torch.Tensor:
        inputs, labels = batch
        extra = {"labels": labels} if labels is not None else {}
        if self.hidden:
            extra["output_hidden_states"] = True
        out = model(**inputs, **extra)
        loss = out.loss if labels is not None else 0.0
        teacher = self._teacher(inputs, out, shared)
        if teacher is not None and self.config.distill_weight > 0:
            loss = loss + self.config.distill_weight * distill_loss(
                out, teacher, self.kind, self.config.temperature, inputs.get("attention_mask"))
        return loss

    def _teacher(self, inputs, out, shared):
        """The teacher's output for this step (None: this architecture is the teacher)."""
        if self.config.teacher == "largest":
            if "teacher" not in shared:   # the sandwich's first architecture is the largest
                shared["teacher"] = _detached(out, self.kind != "kl")
                return None
            return shared["teacher"]
        if "teacher" not in shared:
            with torch.no_grad():
                shared["teacher"] = self.teacher(**inputs, output_hidden_states=self.hidden)
        return shared["teacher"]

    def evaluate(self, model: HFSupernet) -> Dict[str, float]:
        out = {}
        space = model.space
        for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
            model.set_arch(arch)
            for metric, value in held_out_score(model, self.teacher, self.tokenizer, self.valid,
                                                self.causal, self.config.max_length).items():
                out[f"{metric}_{name}"] = value
        return out

    def describe(self, model: HFSupernet) -> str:
        c = self.config
        return (f"{type(self.teacher).__name__} ({model.family.name}) from {c.model}, "
                f"{c.supernet} supernet"
                + (f" (m={c.num_experts})" if c.supernet != "standard" else "")
                + f", teacher {c.teacher}, distillation "
                f"{self.kind}{', LM loss' if self.causal else ''}, space {model.space.genes}, "
                f"{len(self.texts)} training / {len(self.valid)} held-out sentences, batch "
                f"{c.batch_size} per process")


def held_out_score(model: nn.Module, teacher: Optional[nn.Module], tokenizer,
                   texts: Sequence[str], causal: bool, max_length: int = 64,
                   batch_size: int = 32) -> Dict[str, float]:
    """{"perplexity": ...} of a causal LM, else {"teacher_cosine": ...} against ``teacher``,
    on ``texts``."""
    batches = text_batches(tokenizer, texts, batch_size, max_length)
    if causal:
        return {"perplexity": perplexity(model, batches)}
    return {"teacher_cosine": teacher_cosine(model, teacher, batches)}


def train(config: HFConfig, cfg: TrainConfig, log=print) -> Dict:
    """Trains (or resumes) an hf run into ``cfg.out``; see mos_models.common.trainer.train."""
    return trainer.train(HFTask(config), cfg, log)


def load_run(run_dir, device="cpu", log=print) -> Tuple[HFSupernet, Run]:
    """(supernet with the newest loadable checkpoint's weights, in eval mode, Run) of an hf run:
    rebuilt from the source model (its path is in the run) and the checkpoint."""
    return _load_run(run_dir, HFTask, device, log)
