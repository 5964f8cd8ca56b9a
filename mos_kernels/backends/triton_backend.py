"""Triton kernels: not written yet (issue 3)."""


def unavailable_reason(device):
    return "the Triton backend is not implemented yet"
