"""The run directory every trainer writes, and the export directory every model leaves in.

A run directory (``--out`` of ``train``, ``--run`` of the other commands):

    config.json           {"format": "mos-run/1", "task": "mt" | "bert" | ...,
                           "task_config": the task's settings (data, preset, sizes...),
                           "train": the trainer's settings (seed, steps, schedule, runtime),
                           "model": what the task needs to rebuild the model,
                           "world_size": processes of the run}
    checkpoint_<step>.pt  the newest two training states (see checkpoint.py)
    log.jsonl             one line per logged step {"step", "losses", "lr", "grad_norm",
                          "seconds"}, and {"final": metrics} at the end
    metrics.json          the final metrics
    ...                   files the task keeps with the run (e.g. the tokenizer spm.model)

An export directory holds one static sub-network, loadable without the supernet code:

    config.json           {"format": "mos-export/1", "task": ..., "model": what the task needs
                           to build the static model, "params": parameter count, and where it
                           came from (run, step, arch)}
    model.safetensors     its weights
    ...                   files it needs (e.g. spm.model)
"""
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .checkpoint import CheckpointError, load_latest, temp_beside

RUN_FORMAT = "mos-run/1"
EXPORT_FORMAT = "mos-export/1"
PathLike = Union[str, os.PathLike]


def write_json(path: PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON at ``path``, written atomically (temp file, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _read_config(directory: PathLike, fmt: str, what: str) -> Dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} {what}?")
    with open(path) as f:
        config = json.load(f)
    if config.get("format") != fmt:
        raise ValueError(f"{path}: format {config.get('format')!r}, expected {fmt!r} "
                         f"({directory} is not {what} of this version)")
    return config


# ----------------------------------------------------------------------------------------------
# runs

@dataclass
class Run:
    """A training run on disk: its directory, config.json, the task's config (an instance of
    the task's config class) and the step of the checkpoint loaded from it."""
    dir: Path
    config: Dict
    task_config: Any
    step: int
    checkpoint: Path


def read_run_config(run_dir: PathLike, task: Optional[str] = None) -> Dict:
    config = _read_config(run_dir, RUN_FORMAT, "a training run's --out")
    if task is not None and config.get("task") != task:
        raise ValueError(f"{run_dir} is a {config.get('task')!r} run, not a {task!r} run")
    return config


def load_run(run_dir: PathLike, task, device="cpu",
             log: Callable[[str], None] = print) -> Tuple[nn.Module, Run]:
    """(model with the newest loadable checkpoint's weights, in eval mode, Run) of a training
    run of ``task`` (a trainer.Task subclass: its name, config_class and model_from_config)."""
    config = read_run_config(run_dir, task.name)
    found = load_latest(run_dir, device, log)
    if found is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint_<step>.pt")
    path, state = found
    model = task.model_from_config(config["model"])
    model.load_state_dict(state["model"])
    run = Run(Path(run_dir), config, task.config_class(**config["task_config"]),
              int(state["step"]), path)
    return model.to(device).eval(), run


# ----------------------------------------------------------------------------------------------
# exports

def save_export(out_dir: PathLike, task: str, model_config: Dict, model: nn.Module,
                files: Optional[Dict[str, PathLike]] = None,
                extra: Optional[Dict] = None) -> Dict:
    """Writes an export directory (see the module docstring); returns its config.json."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    fd, tmp = temp_beside(out / "model.safetensors")
    os.close(fd)
    save_file(weights, tmp, metadata={"format": EXPORT_FORMAT, "task": task})
    os.replace(tmp, out / "model.safetensors")
    for name, source in (files or {}).items():
        if Path(source).resolve() != (out / name).resolve():
            shutil.copyfile(source, out / name)
    config = {"format": EXPORT_FORMAT, "task": task, "model": model_config,
              "params": sum(p.numel() for p in model.parameters()), **(extra or {})}
    write_json(out / "config.json", config)
    return config


def load_export(model_dir: PathLike, task: str, build: Callable[[Dict], nn.Module],
                device="cpu") -> Tuple[nn.Module, Dict]:
    """(static model in eval mode, config.json) of an export directory."""
    from safetensors.torch import load_file
    config = _read_config(model_dir, EXPORT_FORMAT, "an exported model")
    if config.get("task") != task:
        raise ValueError(f"{model_dir} holds a {config.get('task')!r} model, not a {task!r} one")
    path = Path(model_dir) / "model.safetensors"
    try:
        weights = load_file(str(path), device=str(torch.device(device)))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} could not be read: {exc}") from exc
    model = build(config["model"])
    model.load_state_dict(weights)
    return model.to(device).eval(), config
