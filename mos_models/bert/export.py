"""Export a sub-network of a trained supernet as a static BERT, and load it back.

An exported directory holds ``config.json`` (the layout and where it came from), ``model.pt``
(the state dict of a plain ``BertMLM``: nn.Linear/nn.Embedding/nn.LayerNorm, MoS experts
collapsed, no routers) and the tokenizer ``spm.model``. ``load_exported`` rebuilds the model
from the layout alone, without the supernet code path, so it can be evaluated or fine-tuned
on its own.
"""
import json
import os
import shutil

import torch

from mos_models.common import save_checkpoint
from .model import BertMLM
from .space import Layout


def save_exported(model: BertMLM, out_dir: str, layout: Layout, bottleneck: bool,
                  tokenizer: str = None, extra: dict = None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    info = {"vocab_size": model.tok.num_embeddings, "max_len": model.max_len,
            "embed_dim": layout.embed_dim, "layers": [list(l) for l in layout.layers],
            "bottleneck": bool(bottleneck), "pre_norm": model.pre_norm, "dropout": model.dropout,
            "params": sum(p.numel() for p in model.parameters()), **(extra or {})}
    save_checkpoint(model.state_dict(), os.path.join(out_dir, "model.pt"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(info, f, indent=1)
    if tokenizer and os.path.exists(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(out_dir, "spm.model"))
    return info


def load_exported(model_dir: str, device="cpu"):
    """(BertMLM in eval mode, config dict) of an exported directory."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {model_dir} an exported model?")
    with open(path) as f:
        info = json.load(f)
    layout = Layout(info["embed_dim"], tuple(tuple(l) for l in info["layers"]))
    model = BertMLM.static(info["vocab_size"], info["max_len"], layout, info["bottleneck"],
                           info["dropout"], info.get("pre_norm", False))
    state = torch.load(os.path.join(model_dir, "model.pt"), map_location=device)
    model.load_state_dict(state)
    return model.to(device).eval(), info


def export_run(run_dir: str, arch_text: str, out_dir: str, device="cpu") -> dict:
    from .__main__ import _arch_arg
    from .train import load_run
    supernet, cfg, step = load_run(run_dir, device)
    arch = _arch_arg(arch_text, supernet.space)
    model = supernet.export(arch)
    return save_exported(model, out_dir, supernet.layout(), supernet.space.bottleneck,
                         tokenizer=os.path.join(cfg.data, "spm.model"),
                         extra={"arch": arch, "space": supernet.space.name,
                                "supernet": cfg.supernet, "run": os.path.abspath(run_dir),
                                "step": step})
