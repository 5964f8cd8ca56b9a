"""CUDA C++ kernels (csrc/cuda/), bound in mos_kernels._C when it is built with CUDA."""
import torch

from .cpu_backend import _IMPORT_ERROR, backward, forward  # noqa: F401  same ops, CUDA kernels


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
