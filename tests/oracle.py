"""Shared test helpers: random MoS inputs and the float64 reference to compare against."""
import torch

import mos_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = [b for b in mos_kernels.available_backends(DEVICE) if b != "reference"]

# Elementwise tolerance, relative to the largest reference value of each compared tensor.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(tokens, n_in, n_out, k_max, n_max, m, layerwise, bias_kind, dtype,
                device=DEVICE, lead=()):
    """x (*lead, tokens, n_in); experts (m, n_max, k_max); beta rows that sum to 1; bias form."""
    g = torch.Generator().manual_seed(hash((tokens, n_in, n_out, k_max, n_max, m)) % 2**31)
    x = torch.randn(*lead, tokens, n_in, generator=g)
    experts = torch.randn(m, n_max, k_max, generator=g) / k_max**0.5
    beta = torch.randn(m if layerwise else (n_out, m), generator=g).softmax(-1)
    bias = {"none": None, "shared": torch.randn(n_max, generator=g),
            "expert": torch.randn(m, n_max, generator=g)}[bias_kind]
    tensors = [x, experts, beta] + ([bias] if bias is not None else [])
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]


def run(fn, tensors, n_out, dy=None):
    """Output and the gradients of every input for the cotangent dy (random if None)."""
    x, experts, beta = tensors[:3]
    bias = tensors[3] if len(tensors) > 3 else None
    y = fn(x, experts, beta, bias, out_features=n_out)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    grads = torch.autograd.grad(y, tensors, dy)
    return y, grads, dy


def reference64(tensors, n_out, dy):
    """The naive form in float64 on the CPU, from the same values."""
    tensors64 = [t.detach().cpu().double().requires_grad_(True) for t in tensors]
    y, grads, _ = run(mos_kernels.reference.mos_linear, tensors64, n_out, dy.detach().cpu().double())
    return y, grads


def assert_close(actual, expected, dtype, name):
    expected = expected.to(actual.device)
    scale = expected.abs().max().item() or 1.0
    tol = TOLERANCE[dtype] * scale
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=tol,
                               msg=lambda m: f"{name}: {m}")


def relative_mix64(experts, beta, dtype, rounded):
    """The Triton forward's relative mixing in float64 (for m <= RELATIVE_MAX_EXPERTS): per
    row o the pivot p = the first expert of largest |beta[o]|, the tile E_p plus, for the other
    experts in order, their ratio beta_i / beta_p (fp32's beta_i * (1 / beta_p), rounded to
    dtype) times E_i, each step ``rounded`` to dtype. experts (m, n, k) and beta (n, m) hold
    dtype values. Returns (tile, beta_p as (n, 1) fp32): the kernel multiplies its output by
    the latter."""
    n = beta.shape[0]
    b = beta.float()
    pivot = b.abs().argmax(-1)
    scale = b.gather(1, pivot[:, None])
    inverse = torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1), 0)
    tile = experts[pivot, torch.arange(n)].double()
    others = torch.arange(len(experts)).expand(n, -1)
    others = others[others != pivot[:, None]].view(n, -1)
    for other in others.t():
        ratio = (b.gather(1, other[:, None]) * inverse).to(dtype).double()
        tile = rounded(ratio * experts[other, torch.arange(n)].double() + tile).double()
    return tile, scale
