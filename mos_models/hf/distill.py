"""In-place distillation losses for the Hugging Face supernets, as plain functions.

The teacher is either the original model (kept aside by ``to_supernet``, which converts a copy)
run without gradients, or the largest sub-network of the same sandwich step (its outputs computed
first and detached). Either way the teacher's outputs are detached here: no gradient reaches it.

- ``kl_logits``: KL(teacher || student) of the softened token distributions, times T^2 (Hinton's
  scaling, so the gradient's size does not depend on the temperature); for language models.
- ``hidden_cosine``: 1 - cosine similarity of the last hidden states, per token; for encoders.
- ``hidden_mse``: mean squared difference of the last hidden states, per token.

Every loss averages over the real tokens (``attention_mask``; all tokens when None).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DISTILL_KINDS = ("auto", "kl", "cosine", "mse")


def masked_mean(values: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean of per-token ``values`` (batch, seq) over the tokens where the mask is 1."""
    if attention_mask is None:
        return values.mean()
    if attention_mask.shape != values.shape:
        raise ValueError(f"attention_mask must have shape {tuple(values.shape)} (batch, seq), "
                         f"got {tuple(attention_mask.shape)}")
    weights = attention_mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def _check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student and teacher must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


def kl_logits(student: Tensor, teacher: Tensor, temperature: float = 1.0,
              attention_mask: Optional[Tensor] = None) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) per token, averaged; logits
    (batch, seq, vocab)."""
    _check_pair(student, teacher, "kl_logits")
    if not temperature > 0:
        raise ValueError(f"kl_logits: temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature ** 2
    return masked_mean(per_token, attention_mask)


def hidden_cosine(student: Tensor, teacher: Tensor,
                  attention_mask: Optional[Tensor] = None) -> Tensor:
    """1 - cos(student, teacher) per token, averaged; hidden states (batch, seq, hidden)."""
    _check_pair(student, teacher, "hidden_cosine")
    cos = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)
    return masked_mean(1 - cos, attention_mask)


def hidden_mse(student: Tensor, teacher: Tensor,
               attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean over features of (student - teacher)^2 per token, averaged over tokens."""
    _check_pair(student, teacher, "hidden_mse")
    per_token = (student.float() - teacher.detach().float()).pow(2).mean(-1)
    return masked_mean(per_token, attention_mask)


def last_hidden(output) -> Tensor:
    """The last hidden state of a transformers output: ``last_hidden_state``, else the last of
    ``hidden_states`` (call the model with output_hidden_states=True)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        states = getattr(output, "hidden_states", None)
        if not states:
            raise ValueError(f"{type(output).__name__} has no last_hidden_state or "
                             "hidden_states: call the model with output_hidden_states=True")
        hidden = states[-1]
    return hidden


def distill_loss(student_out, teacher_out, kind: str = "auto", temperature: float = 1.0,
                 attention_mask: Optional[Tensor] = None) -> Tensor:
    """Distillation loss between two transformers outputs of the same batch.

    kind: "kl" (logits), "cosine" or "mse" (last hidden states), or "auto": "kl" when both
    outputs have logits (language models, including masked LMs), else "cosine"."""
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distill_loss: kind must be one of {DISTILL_KINDS}, got {kind!r}")
    if kind == "auto":
        has_logits = all(getattr(o, "logits", None) is not None
                         for o in (student_out, teacher_out))
        kind = "kl" if has_logits else "cosine"
    if kind == "kl":
        if getattr(student_out, "logits", None) is None or teacher_out.logits is None:
            raise ValueError("distill_loss: kind 'kl' needs outputs with logits")
        return kl_logits(student_out.logits, teacher_out.logits, temperature, attention_mask)
    student, teacher = last_hidden(student_out), last_hidden(teacher_out)
    if kind == "cosine":
        return hidden_cosine(student, teacher, attention_mask)
    return hidden_mse(student, teacher, attention_mask)
