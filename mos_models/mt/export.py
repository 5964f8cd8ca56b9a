"""Export one architecture of a trained supernet as a plain static Transformer.

``DIR/model.pt`` holds {"hparams", "state_dict"} of a ``StaticTransformer`` (nn.Linear,
nn.LayerNorm and nn.Embedding only: no experts, no routers), ``DIR/config.json`` the same
hyper-parameters readable by people, and ``DIR/spm.model`` the tokenizer. ``load_static`` builds
the model from these files without touching the supernet classes; ``train --from-model DIR``
trains it further on its own (the paper's additional training).
"""
import json
import shutil
from pathlib import Path


from ..common.checkpoint import load_checkpoint, save_checkpoint
from .config import describe, resolve_arch
from .model import StaticTransformer


def export_run(run_dir, arch_spec, out_dir, log=print) -> Path:
    from .train import load_run
    model, run = load_run(run_dir)
    arch = resolve_arch(model.space, arch_spec)
    static = model.export(arch)
    return save_static(static, out_dir, Path(run_dir) / "spm.model", log)


def save_static(static: StaticTransformer, out_dir, spm_path, log=print) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hparams = static.hparams()
    save_checkpoint({"hparams": hparams, "state_dict": static.state_dict()}, out / "model.pt")
    with open(out / "config.json", "w") as f:
        json.dump(hparams, f, indent=1)
    shutil.copy(spm_path, out / "spm.model")
    params = sum(p.numel() for p in static.parameters())
    log(f"exported {describe(static.arch)} ({params / 1e6:.2f}M parameters) to {out}")
    return out


def load_static(model_dir, device="cpu") -> StaticTransformer:
    """The StaticTransformer saved in ``model_dir/model.pt`` (by export or training)."""
    path = Path(model_dir)
    path = path / "model.pt" if path.is_dir() else path
    state = load_checkpoint(path, device)
    h = state["hparams"]
    model = StaticTransformer(h["vocab_size"], h["arch"], h["qkv_dim"], h["dropout"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval()
