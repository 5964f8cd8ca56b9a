"""Sub-networks out as stock Hugging Face models, and pretrained models in.

``to_static(sn)`` builds the source model's own class with a smaller config (intermediate_size,
num_hidden_layers, and per-layer config lists such as layer_types cut to the kept layers) and
fills it with the active sub-network's weights: the collapsed FFN weights (W_a, b_a) of each kept
layer, everything else copied, kept layers renumbered 0..L-1. ``export(sn, dir)`` saves it with
``save_pretrained`` (config.json, model.safetensors), copies the tokenizer files and writes
``mos_arch.json`` (the architecture and its provenance; no loader needs it).
``AutoModel*.from_pretrained(dir)`` then loads it with no code from this project.
"""
import copy
import json
import os
import re
import shutil
from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .supernet import HFSupernet

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")   # config lists with one entry per layer
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def static_config(sn: HFSupernet):
    """The source config with the active architecture's sizes."""
    config = copy.deepcopy(sn.config)
    active = sn.active_layers(sn.arch["layers"])
    depth = config.num_hidden_layers
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == depth:
            setattr(config, key, [value[i] for i in active])
    config.intermediate_size = sn.arch["ffn"]
    config.num_hidden_layers = sn.arch["layers"]
    return config


@torch.no_grad()
def _static_state(sn: HFSupernet, target_keys) -> Dict[str, Tensor]:
    active = sn.active_layers(sn.arch["layers"])
    layers = sn.layer_list.physical()
    prefix = sn.layers_name + "."
    collapsed = {}
    for new, old in enumerate(active):
        for path in sn.family.widen + sn.family.narrow:
            weight, bias = layers[old].get_submodule(path).collapsed_weights()
            collapsed[f"{prefix}{new}.{path}.weight"] = weight
            if bias is not None:
                collapsed[f"{prefix}{new}.{path}.bias"] = bias
    source = sn.model.state_dict()
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    state = {}
    for key in target_keys:
        if key in collapsed:
            state[key] = collapsed[key]
            continue
        match = pattern.fullmatch(key)
        state[key] = source[f"{prefix}{active[int(match[1])]}.{match[2]}" if match else key]
    return state


@torch.no_grad()
def to_static(sn: HFSupernet) -> nn.Module:
    """The active sub-network as a stock model of the source's class (eval mode, the
    supernet's device and dtype)."""
    reference = next(sn.model.parameters())
    model = type(sn.model)(static_config(sn)).to(device=reference.device, dtype=reference.dtype)
    model.load_state_dict(_static_state(sn, model.state_dict().keys()), strict=True)
    return model.eval()


def tokenizer_files(directory: str) -> Dict[str, str]:
    """{name: path} of the tokenizer files in a model directory."""
    return {name: os.path.join(directory, name) for name in TOKENIZER_FILES
            if os.path.isfile(os.path.join(directory, name))}


def export(sn: HFSupernet, out_dir: str, tokenizer=None, source_dir: Optional[str] = None) -> str:
    """Writes the active sub-network to ``out_dir`` as a stock Hugging Face model directory.

    Tokenizer: ``tokenizer`` (saved with its ``save_pretrained``), else the tokenizer files of
    ``source_dir`` or of the directory the supernet was converted from, if any. Returns out_dir.
    """
    model = to_static(sn)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    else:
        source = source_dir or sn.settings.get("source_dir")
        for name, path in (tokenizer_files(source) if source else {}).items():
            shutil.copyfile(path, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "mos_arch.json"), "w") as f:
        json.dump({"arch": sn.arch, "params": sum(p.numel() for p in model.parameters()),
                   "layers_kept": list(sn.active_layers(sn.arch["layers"])),
                   "supernet": sn.hparams()}, f, indent=1)
        f.write("\n")
    return out_dir


class Pretrained(NamedTuple):
    model: nn.Module
    tokenizer: object   # a transformers tokenizer, or None when the directory has none
    directory: str


def load_pretrained(directory: str, device="cpu") -> Pretrained:
    """The Hugging Face model in ``directory`` (its config's architecture class, e.g.
    BertModel or LlamaForCausalLM, loaded offline, eval mode) and its tokenizer, if any."""
    import transformers
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--model {directory!r}: no such directory")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--model {directory!r} is not a Hugging Face model directory: it has "
                         "no config.json")
    if not any(os.path.isfile(os.path.join(directory, w)) for w in WEIGHT_FILES):
        raise ValueError(f"--model {directory!r} is not a Hugging Face model directory: it has "
                         f"config.json but no weights (one of {', '.join(WEIGHT_FILES)})")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"--model {directory!r}: its config.json is not a Hugging Face model "
                         f"config ({e})") from e
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        cls = transformers.AutoModel
    model = cls.from_pretrained(directory, local_files_only=True).to(device).eval()
    tokenizer = None
    if tokenizer_files(directory):
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return Pretrained(model, tokenizer, directory)
