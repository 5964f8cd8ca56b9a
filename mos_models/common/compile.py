"""--compile: torch.compile of a supernet's blocks, so that a new architecture compiles nothing.

Compiling the whole supernet specialises the graph on every size of the active architecture:
each new architecture would compile again, and a sandwich run meets a new one every step. Making
those sizes symbolic instead (dynamic ints) bounds the count but costs minutes of symbolic-shape
reasoning per graph on a CPU. So the model names its blocks (``compile_units()``: attention and
FFN blocks, or layers) and each block is compiled on its own, in place: a block's graph depends
only on that block's few sizes (say embedding width x FFN width), every layer of the same class
shares the compiled code, and tensor dimensions (batch, sequence length) are dynamic. The number
of compilations is bounded by the choices one block has, not by the architectures; the layer
loop and the embeddings stay eager. A model without ``compile_units`` is compiled whole.

The MoS op is a torch.library custom op, so each MoSLinear is one node in the graph. On CUDA the
default mode is "reduce-overhead" (CUDA graphs, one recording per shape) to hide the host time.
"""
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .distributed import unwrap

# a block of the largest spaces here meets at most ~130 size combinations (the homogeneous BERT
# space: 13 widths x 2 head counts x 5 FFN ratios); past this, dynamo runs that block eagerly
RECOMPILE_LIMIT = 256


def compile_mode(mode: Optional[str], device: torch.device) -> Optional[str]:
    if mode is None:
        return "reduce-overhead" if device.type == "cuda" else None
    return None if mode == "default" else mode


def compile_model(model: nn.Module, enabled: bool, mode: Optional[str], device: torch.device,
                  backend: str = "inductor") -> Callable[[], None]:
    """Compiles ``model``'s blocks in place (see the module docstring); returns a function that
    undoes it (the trainer evaluates and exports eagerly). ``backend``: torch.compile's (tests
    use "aot_eager": the same graphs and counts, no code generation)."""
    if not enabled:
        return lambda: None
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    inner = unwrap(model)
    units = list(inner.compile_units()) if hasattr(inner, "compile_units") else [inner]
    options = {"mode": compile_mode(mode, device)} if backend == "inductor" else {}
    for unit in units:
        unit.compile(dynamic=True, backend=backend, **options)

    def undo() -> None:
        for unit in units:
            unit._compiled_call_impl = None
    return undo


def compile_stats() -> Dict[str, int]:
    """Graphs dynamo compiled so far in this process (each with its backward)."""
    from torch._dynamo.utils import counters
    return {"compiled_graphs": int(counters["stats"]["unique_graphs"])}
