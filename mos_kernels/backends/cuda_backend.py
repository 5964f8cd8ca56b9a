"""CUDA C++ kernels (csrc/cuda/), bound in mos_kernels._C when it is built with CUDA. The
strategy ("auto" = "combine", or "one_pass") goes to the binding as an argument. "one_pass" runs
the pipelined forward/dx kernels for fp16 (and bf16 from sm_80), the fused path of V100 and T4,
where Triton does not run (docs/design.md, section 5); "auto" stays "combine" until they are
timed."""
from . import cpu_backend
from .cpu_backend import _IMPORT_ERROR


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


# The extension ops: their CUDA kernels are registered beside the CPU ones.
forward = cpu_backend.forward
backward = cpu_backend.backward
combine = cpu_backend.combine
combine_backward = cpu_backend.combine_backward
