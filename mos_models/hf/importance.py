"""Importance of FFN neurons and of layers on calibration batches (Minitron's recipe), and the
neuron permutation that puts the most important neurons first.

- Neuron importance: mean absolute activation of each FFN intermediate neuron (the input of the
  ``narrow`` linear, i.e. after the activation and, for Llama, after the gate), averaged over the
  real tokens of every batch (padding excluded through ``attention_mask``).
- Layer importance: Minitron's block importance, 1 - cos(layer input, layer output) averaged over
  the real tokens: a layer that hardly changes its input matters least.

Neurons are then permuted inside each layer (rows of the widen linears and their biases, columns
of the narrow linears) so that an FFN slice of width w keeps the w most important; this changes no
output. Layers are not moved: the supernet keeps the L most important ones, run in their original
order.
"""
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .families import Found


def as_batch(batch, device) -> Dict[str, Tensor]:
    """A calibration or evaluation batch as model keyword arguments on ``device``: a dict of
    tensors (input_ids, attention_mask, ...) or a bare tensor of input ids."""
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("batches must be dicts with 'input_ids' (and optionally "
                         "attention_mask, token_type_ids) or tensors of input ids, got "
                         f"{type(batch).__name__}")
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _token_weights(mask: Optional[Tensor], shape: torch.Size) -> Optional[Tensor]:
    """The attention mask as float weights when it matches the tokens' leading shape."""
    if mask is None or tuple(mask.shape) != tuple(shape):
        return None
    return mask.to(torch.float32)


class _Accumulator:
    """Masked sums over tokens, per layer: FFN |activation| (I,) and 1 - cos (scalar)."""

    def __init__(self, depth: int, ffn: int, device):
        self.neuron = torch.zeros(depth, ffn, dtype=torch.float64, device=device)
        self.neuron_count = torch.zeros(depth, dtype=torch.float64, device=device)
        self.layer = torch.zeros(depth, dtype=torch.float64, device=device)
        self.layer_count = torch.zeros(depth, dtype=torch.float64, device=device)
        self.mask: Optional[Tensor] = None

    def add_neurons(self, index: int, act: Tensor) -> None:
        act = act.detach().abs().to(torch.float32)
        weights = _token_weights(self.mask, act.shape[:-1])
        if weights is None:
            flat = act.reshape(-1, act.shape[-1])
            self.neuron[index] += flat.sum(0).double()
            self.neuron_count[index] += flat.shape[0]
        else:
            self.neuron[index] += (act * weights.unsqueeze(-1)).sum(
                dim=tuple(range(act.dim() - 1))).double()
            self.neuron_count[index] += weights.sum().double()

    def add_layer(self, index: int, x_in: Tensor, x_out: Tensor) -> None:
        distance = 1 - torch.cosine_similarity(x_in.detach().float(), x_out.detach().float(),
                                               dim=-1)
        weights = _token_weights(self.mask, distance.shape)
        if weights is None:
            weights = torch.ones_like(distance)
        self.layer[index] += (distance * weights).sum().double()
        self.layer_count[index] += weights.sum().double()


def _hooks(found: Found, acc: _Accumulator) -> List:
    handles = []
    for i, layer in enumerate(found.layers):
        narrow = layer.get_submodule(found.family.narrow[0])
        handles.append(narrow.register_forward_pre_hook(
            lambda module, args, i=i: acc.add_neurons(i, args[0])))

        def on_layer(module, args, kwargs, output, i=i):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            acc.add_layer(i, x_in, x_out)
        handles.append(layer.register_forward_hook(on_layer, with_kwargs=True))
    return handles


@torch.no_grad()
def importance(model: nn.Module, found: Found, batches: Iterable) -> Tuple[Tensor, Tensor]:
    """(neuron scores (layers, intermediate), layer scores (layers,)) of ``model`` on
    ``batches``; the model runs in eval mode (restored afterwards)."""
    device = next(model.parameters()).device
    ffn = found.layers[0].get_submodule(found.family.widen[0]).out_features
    acc = _Accumulator(len(found.layers), ffn, device)
    handles = _hooks(found, acc)
    was_training = model.training
    model.eval()
    try:
        count = 0
        for batch in batches:
            batch = as_batch(batch, device)
            acc.mask = batch.get("attention_mask")
            model(**batch)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("to_supernet: calibration holds no batches (pass None to keep the "
                         "original order)")
    neuron = acc.neuron / acc.neuron_count.clamp_min(1).unsqueeze(1)
    layer = acc.layer / acc.layer_count.clamp_min(1)
    return neuron.float().cpu(), layer.float().cpu()


@torch.no_grad()
def permute_neurons(found: Found, neuron_scores: Tensor) -> None:
    """Reorders each layer's FFN neurons by decreasing score (stable), in place."""
    for layer, scores in zip(found.layers, neuron_scores):
        order = torch.argsort(scores, descending=True, stable=True)
        for path in found.family.widen:
            linear = layer.get_submodule(path)
            linear.weight.copy_(linear.weight[order.to(linear.weight.device)])
            if linear.bias is not None:
                linear.bias.copy_(linear.bias[order.to(linear.bias.device)])
        for path in found.family.narrow:
            linear = layer.get_submodule(path)
            linear.weight.copy_(linear.weight[:, order.to(linear.weight.device)])


def layer_ranking(layer_scores: Tensor) -> List[int]:
    """Layer indices from most to least important (ties: the earlier layer first)."""
    return torch.argsort(layer_scores, descending=True, stable=True).tolist()
