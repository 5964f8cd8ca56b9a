"""C++ kernels of mos_kernels._C (csrc/mos_linear_cpu.cpp) for CPU tensors."""
import torch

_IMPORT_ERROR = None
try:
    from .. import _C  # noqa: F401  registers torch.ops.mos_kernels_ext
except ImportError as exc:  # not built: the reference backend still works
    _IMPORT_ERROR = exc


def unavailable_reason(device):
    if _IMPORT_ERROR is not None:
        return ("the C++ extension mos_kernels._C is not built (pip install "
                f"--no-build-isolation -e .): {_IMPORT_ERROR}")
    if device.type != "cpu":
        return f"it runs on CPU tensors, got a tensor on {device}"
    return None


def forward(x, experts, beta, bias, strategy="auto"):
    return torch.ops.mos_kernels_ext.forward(x, experts, beta, bias, strategy)


def backward(dy, x, experts, beta, bias, needs, strategy="auto"):
    return torch.ops.mos_kernels_ext.backward(dy, x, experts, beta, bias, list(needs), strategy)


def combine(experts, beta, bias, n_in):
    return torch.ops.mos_kernels_ext.combine(experts, beta, bias, n_in)


def combine_backward(d_weight, d_mixed_bias, experts, beta, bias, needs):
    return torch.ops.mos_kernels_ext.combine_backward(d_weight, d_mixed_bias, experts, beta, bias,
                                                      list(needs))
