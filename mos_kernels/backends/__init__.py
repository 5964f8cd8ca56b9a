"""Fused backends. ("reference" is mos_kernels.reference, called directly.) Each module provides:

    unavailable_reason(device) -> str | None     None when it can run on that device
    forward(x, experts, beta, bias) -> y
    backward(dy, x, experts, beta, bias, needs) -> (dx, dexperts, dbeta, dbias)

with x (T, n_in), beta (n_out, m) (row stride 0 for layer-wise MoS), y (T, n_out); `needs` says
which of the four gradients to compute, the others come back as empty tensors. Gradients are
contiguous and have the shapes of their inputs (dexperts zero outside the active slice).
"""
import functools
import importlib

FUSED = ("cpu", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def load(name: str):
    return importlib.import_module(f"{__name__}.{name}_backend")
