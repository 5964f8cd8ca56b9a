"""The exported form of one BERT architecture: a plain static BERT on disk.

An export directory (mos_models.common.run) holds ``config.json`` (format, the layout in
"model", parameter count, where it came from), ``model.safetensors`` (the state dict of a plain
``BertMLM``: nn.Linear/nn.Embedding/nn.LayerNorm, MoS experts collapsed, no routers) and the
tokenizer ``spm.model``. ``load_exported`` rebuilds the model from the layout alone, without the
supernet code path, so it can be evaluated or fine-tuned on its own. ``export_run`` (in
train.py) makes one from a training run.
"""
import os
from typing import Dict, Optional, Tuple

from ..common.run import load_export, save_export
from .model import BertMLM, build_static, static_hparams
from .space import Layout


def save_exported(model: BertMLM, out_dir: str, layout: Layout, bottleneck: bool,
                  tokenizer: Optional[str] = None, extra: Optional[Dict] = None) -> Dict:
    """Writes the export directory; returns its config.json."""
    files = {"spm.model": tokenizer} if tokenizer and os.path.exists(tokenizer) else None
    return save_export(out_dir, "bert", static_hparams(model, layout, bottleneck), model,
                       files, extra)


def load_exported(model_dir: str, device="cpu") -> Tuple[BertMLM, Dict]:
    """(BertMLM in eval mode, config.json) of an export directory; the layout, vocabulary and
    maximum length are in config["model"]."""
    return load_export(model_dir, "bert", build_static, device)
