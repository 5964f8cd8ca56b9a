"""The model families a supernet can be made from, recognised by structure, not class name.

A family names the feed-forward (FFN) linears inside one transformer layer:

- ``widen``: hidden -> intermediate (their rows are the FFN neurons),
- ``narrow``: intermediate -> hidden (their columns are the FFN neurons).

BERT-style encoders (BertModel, BertForMaskedLM, ... and models with the same layer layout, e.g.
RoBERTa): ``intermediate.dense`` then ``output.dense``. Llama-style decoders (LlamaForCausalLM,
Mistral, Qwen2, ...): ``mlp.gate_proj`` and ``mlp.up_proj`` then ``mlp.down_proj``. Only BERT and
Llama are tested; others are accepted when their structure and config (``intermediate_size``,
``num_hidden_layers``) match.
"""
from dataclasses import dataclass
from typing import List, Tuple

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    widen: Tuple[str, ...]
    narrow: Tuple[str, ...]
    examples: str

    def describe(self) -> str:
        return (f"{self.name} ({self.examples}: layers with "
                f"{', '.join(self.widen + self.narrow)})")


BERT = Family("BERT-style encoder", ("intermediate.dense",), ("output.dense",),
              "BertModel, BertForMaskedLM, ...")
LLAMA = Family("Llama-style decoder", ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),
               "LlamaForCausalLM, ...")
FAMILIES = (BERT, LLAMA)
SUPPORTED = "; ".join(f.describe() for f in FAMILIES)


@dataclass
class Found:
    """Where a family sits inside a model: the name and module of its layer list."""
    family: Family
    layers_name: str
    layers: nn.ModuleList


def _linear(module: nn.Module, path: str):
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        return None
    return sub if isinstance(sub, nn.Linear) else None


def _matches(layer: nn.Module, family: Family, hidden: int, ffn: int) -> bool:
    for path in family.widen + family.narrow:
        linear = _linear(layer, path)
        if linear is None:
            return False
        shape = (ffn, hidden) if path in family.widen else (hidden, ffn)
        if tuple(linear.weight.shape) != shape:
            return False
    return True


def detect(model: nn.Module) -> Found:
    """The family of ``model`` and its layer list; a clear error for anything else."""
    config = getattr(model, "config", None)
    ffn = getattr(config, "intermediate_size", None)
    depth = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    model_type = getattr(config, "model_type", None)
    what = f"{type(model).__name__} (model_type {model_type!r})"
    if not all(isinstance(v, int) for v in (ffn, depth, hidden)):
        raise ValueError(f"to_supernet: {what} is not a supported model family: its config needs "
                         f"integer intermediate_size, num_hidden_layers and hidden_size. "
                         f"Supported: {SUPPORTED}")
    found: List[Found] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            for family in FAMILIES:
                if all(_matches(layer, family, hidden, ffn) for layer in module):
                    found.append(Found(family, name, module))
    if len(found) != 1:
        why = "no layer list matches" if not found else (
            f"several layer lists match ({', '.join(f.layers_name for f in found)})")
        raise ValueError(f"to_supernet: {what} is not a supported model family ({why}). "
                         f"Supported: {SUPPORTED}")
    return found[0]
