"""The exported form of one MT architecture: a plain static Transformer on disk.

An export directory (mos_models.common.run) holds ``config.json`` (format, the model's
hyper-parameters, parameter count, where it came from), ``model.safetensors`` (the state dict of
a ``StaticTransformer``: nn.Linear, nn.LayerNorm and nn.Embedding only, no experts, no routers)
and the tokenizer ``spm.model``. ``load_static`` builds the model from these files without the
supernet classes; ``train --from-model DIR`` trains it further on its own (the paper's
additional training). ``export_run`` (in train.py) makes one from a training run.
"""
from pathlib import Path
from typing import Dict, Optional

from ..common.run import load_export, save_export
from .config import describe
from .model import StaticTransformer, build_model


def save_static(static: StaticTransformer, out_dir, spm_path, log=print,
                source: Optional[Dict] = None) -> Path:
    out = Path(out_dir)
    info = save_export(out, "mt", static.hparams(), static, {"spm.model": spm_path},
                       {"source": source} if source else None)
    log(f"exported {describe(static.arch)} ({info['params'] / 1e6:.2f}M parameters) to {out}")
    return out


def load_static(model_dir, device="cpu") -> StaticTransformer:
    """The StaticTransformer of an export directory, in eval mode."""
    model, _ = load_export(model_dir, "mt", build_model, device)
    if not isinstance(model, StaticTransformer):
        raise ValueError(f"{model_dir} does not hold a static MT model")
    return model
