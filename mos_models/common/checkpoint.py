"""Atomic checkpoints and ``--resume``.

``save_checkpoint`` writes to a temporary file in the target directory, flushes and fsyncs it,
then ``os.replace``s it over the target, so a run killed at any moment leaves either the old or
the new checkpoint, never a torn one. ``save_training_state`` / ``load_training_state`` bundle
what a resumed run needs: model, optimizer, scheduler, step, RNG states and any extra state
(e.g. the data position), in numbered files ``checkpoint_<step>.pt`` of which the newest
``keep`` are kept.
"""
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import nn

PathLike = Union[str, os.PathLike]
_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


def save_checkpoint(obj: Any, path: PathLike) -> Path:
    """torch.save(obj) to ``path`` atomically (temp file, flush, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: PathLike, map_location="cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=False)


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The ``checkpoint_<step>.pt`` in ``directory`` with the highest step, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def rng_states() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def save_training_state(directory: PathLike, step: int, model: nn.Module,
                        optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                        extra: Optional[Dict[str, Any]] = None, keep: int = 2) -> Path:
    """Writes ``directory/checkpoint_<step>.pt`` atomically and deletes all but the newest
    ``keep`` checkpoints. ``extra`` holds anything else to restore (config, data position...)."""
    state = {"step": int(step), "model": _unwrap(model).state_dict(),
             "optimizer": None if optimizer is None else optimizer.state_dict(),
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "rng": rng_states(), "extra": dict(extra or {})}
    path = save_checkpoint(state, Path(directory) / f"checkpoint_{int(step)}.pt")
    old = sorted((int(m.group(1)), p) for p in Path(directory).iterdir()
                 if (m := _NAME.match(p.name)))
    for _, p in old[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
    return path


def load_training_state(directory_or_file: PathLike, model: nn.Module,
                        optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                        restore_rng: bool = True, map_location="cpu") -> Optional[Dict[str, Any]]:
    """Loads the latest checkpoint of a directory (or the given file) into model, optimizer and
    scheduler and restores the RNG states. Returns {"step", "extra", "path"}, or None when the
    directory holds no checkpoint."""
    path = Path(directory_or_file)
    if path.is_dir() or not path.exists():
        path = latest_checkpoint(path)
        if path is None:
            return None
    state = load_checkpoint(path, map_location)
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_states(state["rng"])
    return {"step": state["step"], "extra": state["extra"], "path": path}
