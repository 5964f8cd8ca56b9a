"""CUDA C++ kernels (csrc/cuda/), bound in mos_kernels._C when it is built with CUDA."""
import contextlib
import os


from . import cpu_backend
from .cpu_backend import _IMPORT_ERROR

# The binding's strategies (csrc/cuda/mos_linear_cuda.cpp): "gemm" (combine, then cuBLAS; its
# default) and "fused" (one-pass WMMA kernels). "auto" leaves the choice to the binding.
STRATEGIES = ("gemm", "fused")
strategy = "auto"


@contextlib.contextmanager
def _chosen_strategy():
    if strategy == "auto":
        yield
        return
    if strategy not in STRATEGIES:
        raise ValueError(f"cuda_backend.strategy must be 'auto' or one of {STRATEGIES}, "
                         f"got {strategy!r}")
    saved = os.environ.get("MOS_CUDA_STRATEGY")
    os.environ["MOS_CUDA_STRATEGY"] = strategy
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MOS_CUDA_STRATEGY"]
        else:
            os.environ["MOS_CUDA_STRATEGY"] = saved


def unavailable_reason(device):
    if _IMPORT_ERROR is not None:
        return f"the extension mos_kernels._C is not built: {_IMPORT_ERROR}"
    from .. import _C
    if not _C.with_cuda:
        return ("mos_kernels._C was built without CUDA (needs CUDA torch and a CUDA toolkit, "
                "or FORCE_CUDA=1, at install time)")
    if device.type != "cuda":
        return f"it runs on CUDA tensors, got a tensor on {device}"
    return None


def forward(x, experts, beta, bias):
    with _chosen_strategy():
        return cpu_backend.forward(x, experts, beta, bias)


def backward(dy, x, experts, beta, bias, needs):
    with _chosen_strategy():
        return cpu_backend.backward(dy, x, experts, beta, bias, needs)


combine = cpu_backend.combine  # the extension op; its CUDA kernel is registered beside the CPU one
combine_backward = cpu_backend.combine_backward
