"""Atomic checkpoints that load without running pickled code, and ``--resume``.

``save_checkpoint`` writes to a temporary file in the target directory, flushes and fsyncs it,
then ``os.replace``s it over the target, so a run killed at any moment leaves either the old or
the new checkpoint, never a torn one. ``load_checkpoint`` reads with
``torch.load(weights_only=True)``: tensors and plain Python types (dict, list, tuple, str, int,
float, bool, None) only, so opening a checkpoint from someone else cannot run code; everything
stored here (RNG states included) is kept in those types for that reason.

``save_training_state`` / ``load_training_state`` bundle what a resumed run needs: model,
optimizer, scheduler, step, RNG states and any extra state, in numbered files
``checkpoint_<step>.pt`` of which the newest ``keep`` are kept. A newest checkpoint that cannot
be read (a disk that filled up, a file copied half-way) is reported and skipped: the previous
one is kept for exactly that.
"""
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

PathLike = Union[str, os.PathLike]
_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: unreadable, or holding pickled Python objects."""


# The process's umask, read once at import (reading it means setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)


def temp_beside(path: PathLike) -> Tuple[int, str]:
    """(fd, name) of a new temporary file in ``path``'s folder, to be renamed onto ``path``.
    mkstemp makes it private (0600); it gets the mode a plain open() would give instead."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def save_checkpoint(obj: Any, path: PathLike) -> Path:
    """torch.save(obj) to ``path`` atomically (temp file, flush, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
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
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Makes a rename inside ``directory`` durable (where the OS allows opening directories)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: PathLike, map_location="cpu") -> Any:
    """What ``save_checkpoint`` wrote, read with ``weights_only=True``. Raises CheckpointError
    (naming the file) when it is not a complete torch.save archive or holds pickled objects."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (not a torch.save archive: "
                              "truncated, or another kind of file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} holds pickled Python objects, which are not loaded (only tensors and plain "
            f"types are: torch.load(weights_only=True) refused it: {reason}). If you trust its "
            "source, open it yourself with torch.load(..., weights_only=False).") from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} could not be read: {exc}") from exc


def checkpoints(directory: PathLike) -> List[Tuple[int, Path]]:
    """(step, path) of the ``checkpoint_<step>.pt`` files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)))


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The ``checkpoint_<step>.pt`` in ``directory`` with the highest step, or None."""
    found = checkpoints(directory)
    return found[-1][1] if found else None


def load_latest(directory: PathLike, map_location="cpu",
                log: Callable[[str], None] = print) -> Optional[Tuple[Path, Any]]:
    """(path, contents) of the newest checkpoint in ``directory`` that loads, newest first; each
    one that does not is reported through ``log`` and skipped. None when the directory holds no
    checkpoint; CheckpointError when it holds some and none loads."""
    found = checkpoints(directory)
    errors = []
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            errors.append(str(exc))
            log(f"warning: skipping {path.name}: {exc}")
    if errors:
        raise CheckpointError(f"{directory}: no checkpoint could be loaded:\n  " +
                              "\n  ".join(errors))
    return None


def set_aside_newer(directory: PathLike, step: int, log: Callable[[str], None] = print) -> None:
    """Renames the checkpoints newer than ``step`` (the unreadable ones a resume skipped) to
    ``<name>.unreadable``: kept for inspection, but never again taken for the newest, and never
    kept by pruning in place of a readable one."""
    for newer_step, path in checkpoints(directory):
        if newer_step > step:
            path.rename(path.with_name(path.name + ".unreadable"))
            log(f"moved the unreadable {path.name} aside to {path.name}.unreadable")


# ----------------------------------------------------------------------------------------------
# random-number generators, as tensors and plain types

def rng_states() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(value):
    """random.setstate wants tuples; a checkpoint may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def set_rng_states(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# training state

def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)     # torch.compile's wrapper
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_training_state(directory: PathLike, step: int, model: nn.Module,
                        optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                        extra: Optional[Dict[str, Any]] = None, keep: int = 2) -> Path:
    """Writes ``directory/checkpoint_<step>.pt`` atomically and deletes all but the newest
    ``keep`` checkpoints. ``extra``: anything else to restore, in tensors and plain types."""
    state = {"step": int(step), "model": _unwrap(model).state_dict(),
             "optimizer": None if optimizer is None else optimizer.state_dict(),
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "rng": rng_states(), "extra": dict(extra or {})}
    path = save_checkpoint(state, Path(directory) / f"checkpoint_{int(step)}.pt")
    for _, old in checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_training_state(directory_or_file: PathLike, model: nn.Module,
                        optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                        restore_rng: bool = True, map_location="cpu",
                        log: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
    """Loads the newest loadable checkpoint of a directory (or the given file) into model,
    optimizer and scheduler and restores the RNG states. Returns {"step", "extra", "path"}, or
    None when the directory holds no checkpoint."""
    path = Path(directory_or_file)
    if path.is_dir() or not path.exists():
        found = load_latest(path, map_location, log)
        if found is None:
            return None
        path, state = found
    else:
        state = load_checkpoint(path, map_location)
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_states(state["rng"])
    return {"step": state["step"], "extra": state["extra"], "path": path}
