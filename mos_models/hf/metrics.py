"""Evaluation of Hugging Face supernets and models, and the cost of the experts.

- ``teacher_cosine``: mean cosine similarity of a model's sentence embeddings (last hidden states,
  mean-pooled over the real tokens) to the teacher's, over every sentence of the batches.
- ``perplexity``: exp of the mean next-token negative log-likelihood over the real tokens.
- ``cost_report``: parameters and bytes of the source model against the supernet's.
"""
from contextlib import contextmanager
from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mos_models.common.elastic import ElasticLinear

from .distill import last_hidden
from .importance import as_batch
from .supernet import has_bias


@contextmanager
def evaluating(*models: nn.Module):
    """Eval mode and no gradients inside; each model's mode restored afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def mean_pool(hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """(batch, hidden): the mean of the hidden states (batch, seq, hidden) over real tokens."""
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def _device(model: nn.Module):
    return next(model.parameters()).device


def _embed(model: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    out = model(**batch, output_hidden_states=True)
    return mean_pool(last_hidden(out).float(), batch.get("attention_mask"))


def teacher_cosine(model: nn.Module, teacher: nn.Module, batches: Iterable) -> float:
    """Mean over sentences of cos(mean-pooled last hidden state of ``model``, of ``teacher``);
    ``model`` is a supernet (at its active architecture) or any model of the same tokenizer."""
    total, count = 0.0, 0
    with evaluating(model, teacher):
        for batch in batches:
            batch = as_batch(batch, _device(model))
            student = _embed(model, batch)
            target = _embed(teacher, as_batch(batch, _device(teacher))).to(student.device)
            total += F.cosine_similarity(student, target, dim=-1).double().sum().item()
            count += student.shape[0]
    if count == 0:
        raise ValueError("teacher_cosine: batches is empty")
    return total / count


def perplexity(model: nn.Module, batches: Iterable) -> float:
    """exp(mean negative log-likelihood of each next real token) of a causal language model."""
    nll, tokens = 0.0, 0
    with evaluating(model):
        for batch in batches:
            batch = as_batch(batch, _device(model))
            batch.pop("labels", None)
            logits = getattr(model(**batch), "logits", None)
            if logits is None:
                raise ValueError("perplexity needs a causal language model (outputs with logits)")
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                     reduction="none")
            keep = mask[:, 1:].bool() & mask[:, :-1].bool()
            nll += losses[keep].double().sum().item()
            tokens += int(keep.sum())
    if tokens == 0:
        raise ValueError("perplexity: the batches hold no predictable tokens")
    return float(torch.tensor(nll / tokens).exp())


def cost_report(sn: nn.Module, optimizer_states: int = 2) -> Dict[str, float]:
    """Parameters and bytes of the source model ("original": every FFN linear a plain dense
    layer) and of the supernet (experts and routers): ``*_params``, ``*_bytes`` (weights in the
    parameters' dtype) and ``*_train_bytes`` (weights, gradients and ``optimizer_states`` moments
    per parameter, Adam's 2; activations excluded)."""
    linears = [m for m in sn.modules() if isinstance(m, ElasticLinear)]
    in_linears = {id(p) for lin in linears for p in lin.parameters()}
    params = list(sn.parameters())
    other = sum(p.numel() for p in params if id(p) not in in_linears)
    dense = sum(lin.out_features * lin.in_features
                + (lin.out_features if has_bias(lin) else 0) for lin in linears)
    routers = sum(p.numel() for lin in linears if lin.mos is not None
                  for p in lin.mos.router.parameters())
    supernet = sum(p.numel() for p in params)
    size = params[0].element_size()
    report = {"original_params": other + dense, "supernet_params": supernet,
              "expert_params": supernet - other - routers, "router_params": routers,
              "extra_params": supernet - other - dense}
    for name in ("original", "supernet", "extra"):
        report[f"{name}_bytes"] = report[f"{name}_params"] * size
        report[f"{name}_train_bytes"] = report[f"{name}_params"] * size * (2 + optimizer_states)
    report["train_ratio"] = report["supernet_train_bytes"] / report["original_train_bytes"]
    return report
