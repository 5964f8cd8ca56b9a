"""The CUDA backend's elementwise kernels (csrc/cuda/mos_linear_elementwise.cuh: W_a's combine, the
experts' gradient from cuBLAS's G with the dbeta partials and W_a for dx, the column sums of dy,
dbeta and dbias)
run on the CPU, unit by unit over the kernels' own grid (tests/cuda_emulation.cpp), against the
float64 reference. Shapes cover both of a unit's paths (16-byte vectors, and element by element for
units that straddle the slice's edge or rows that are unaligned or strided). Needs nvcc for the
CUDA headers, no GPU."""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from oracle import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA headers) on PATH")

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


class Matrix(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p)] + [
        (n, ctypes.c_int64) for n in ("rows", "cols", "row_stride", "col_stride")]


class Mixture(ctypes.Structure):
    _fields_ = ([("experts", ctypes.c_void_p)]
                + [(n, ctypes.c_int64) for n in ("m", "n_max", "k_max", "expert_stride",
                                                 "row_stride", "col_stride")]
                + [("beta", ctypes.c_void_p)]
                + [(n, ctypes.c_int64) for n in ("beta_row_stride", "beta_expert_stride",
                                                 "n_out", "n_in")])


class Bias(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("kind", ctypes.c_int),
                ("expert_stride", ctypes.c_int64), ("stride", ctypes.c_int64)]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("emulation") / "libmos_emulation.so"
    # The flags torch's CUDA builds pass that change what the header compiles to.
    cmd = [NVCC, "-x", "c++", "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC,-Wall,-Werror",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-I", os.path.join(ROOT, "csrc", "cuda"),
           os.path.join(ROOT, "tests", "cuda_emulation.cpp"), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"
    return ctypes.CDLL(str(out))


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def matrix(t):
    return Matrix(t.data_ptr(), *t.shape, *t.stride())


def mixture(experts, beta, n_out, n_in):
    return Mixture(experts.data_ptr(), *experts.shape, *experts.stride(), beta.data_ptr(),
                   *beta.stride(), n_out, n_in)


def bias_struct(bias):
    if bias is None:
        return Bias(None, 0, 0, 0)
    if bias.dim() == 1:
        return Bias(bias.data_ptr(), 1, 0, bias.stride(0))
    return Bias(bias.data_ptr(), 2, bias.stride(0), bias.stride(1))


# (n_out, n_in, n_max, k_max, m). Units span 32 * 4 vectors of 16 bytes along a row, so the wide
# rows are the ones where whole units take the vector path (fp16 from n_in >= 776 on).
# n_out = 16 gives dy rows that take 16-byte loads in the column sums.
SHAPES = [(1, 1, 1, 8, 1), (7, 33, 9, 40, 3), (33, 127, 40, 136, 2), (5, 1030, 7, 1040, 2),
          (3, 2048, 3, 2048, 6), (4, 520, 6, 1100, 2), (16, 40, 24, 48, 2)]
# contiguous: 16-byte rows when k_max allows; padded: rows k_max + 1 apart (never aligned);
# transposed: experts and G with a column stride other than 1.
LAYOUTS = ["contiguous", "padded", "transposed"]
MIXES = [(False, "expert"), (True, "shared"), (False, "none")]  # (layer-wise, bias)


def make(shape, layout, layerwise, bias_kind, dtype, seed=0):
    n_out, n_in, n_max, k_max, m = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        experts = torch.randn(m, n_max, k_max, generator=g)
    elif layout == "padded":
        experts = torch.randn(m, n_max, k_max + 1, generator=g)[..., :k_max]
    else:
        experts = torch.randn(m, k_max, n_max, generator=g).transpose(1, 2)
    if layerwise:  # one score per expert, broadcast over rows with stride 0
        beta = torch.randn(m, generator=g).softmax(-1).to(dtype).expand(n_out, m)
    else:
        beta = torch.randn(n_out, m, generator=g).softmax(-1).to(dtype)
    bias = {"none": None, "shared": torch.randn(n_max, generator=g),
            "expert": torch.randn(m, n_max, generator=g)}[bias_kind]
    product = (torch.randn(n_in, n_out, generator=g).t() if layout == "transposed"
               else torch.randn(n_out, n_in, generator=g))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  keeps strides
    return cast(experts), beta, cast(bias), cast(product)


def make_dy(tokens, n_out, layout, dtype):
    """The cotangent dy (tokens, n_out): rows 16-byte aligned when contiguous, not when padded,
    a column stride other than 1 when transposed (like the experts of that layout)."""
    g = torch.Generator().manual_seed(2)
    if layout == "contiguous":
        dy = torch.randn(tokens, n_out, generator=g)
    elif layout == "padded":
        dy = torch.randn(tokens, n_out + 1, generator=g)[:, :n_out]
    else:
        dy = torch.randn(n_out, tokens, generator=g).t()
    return dy.to(dtype)


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("layerwise,bias_kind", MIXES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_combine(lib, shape, layout, layerwise, bias_kind, dtype):
    n_out, n_in = shape[:2]
    experts, beta, bias, _ = make(shape, layout, layerwise, bias_kind, dtype)
    weight = nan_like((n_out, n_in), dtype)
    mixed = nan_like((n_out,), dtype) if bias is not None else None
    mix = mixture(experts, beta, n_out, n_in)
    assert lib.mos_emulate_combine(DTYPE_CODES[dtype], ctypes.byref(mix),
                                   ctypes.byref(bias_struct(bias)), ptr(weight), ptr(mixed)) == 0

    e64, beta64 = experts.double()[:, :n_out, :n_in], beta.double()
    assert_close(weight, torch.einsum("oi,iok->ok", beta64, e64), dtype, "W_a")
    if bias is not None:
        b64 = bias.double()
        expected = b64[:n_out] if bias.dim() == 1 else (beta64 * b64[:, :n_out].t()).sum(1)
        assert_close(mixed, expected, dtype, "b_a")


# (d_experts, d_beta, d_bias, W_a): the backward asks for W_a with the weight gradients when dx is
# wanted too.
NEEDS = [(True, True, True, True), (True, False, False, False), (False, True, False, True),
         (False, False, True, False), (False, False, False, True)]
# (layer-wise, bias, needs): dbias alone only where there is a bias.
GRAD_CASES = [(layerwise, bias, needs) for layerwise, bias in MIXES for needs in NEEDS
              if any(needs[:2]) or needs[3] or bias != "none"]


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("layerwise,bias_kind,needs", GRAD_CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 64, 200])  # column sums take 64 rows per part
def test_weight_grad_from_product(lib, shape, layout, layerwise, bias_kind, needs, tokens, dtype):
    want_de, want_dbeta, want_dbias, want_weight = needs
    want_dbias = want_dbias and bias_kind != "none"
    n_out, n_in, n_max, k_max, m = shape
    experts, beta, bias, product = make(shape, layout, layerwise, bias_kind, dtype)
    dy = make_dy(tokens, n_out, layout, dtype)
    d_experts = nan_like((m, n_max, k_max), dtype) if want_de else None
    d_beta = nan_like((n_out, m), dtype) if want_dbeta else None
    d_bias = nan_like(tuple(bias.shape), dtype) if want_dbias else None
    weight = nan_like((n_out, n_in), dtype) if want_weight else None
    mix = mixture(experts, beta, n_out, n_in)
    assert lib.mos_emulate_weight_grad_from_product(
        DTYPE_CODES[dtype], ctypes.byref(matrix(product)), ctypes.byref(matrix(dy)),
        ctypes.byref(mix), ctypes.byref(bias_struct(bias)),
        ptr(d_experts), ptr(d_beta), ptr(d_bias), ptr(weight)) == 0

    e64, beta64, g64, s64 = experts.double(), beta.double(), product.double(), dy.double().sum(0)
    if want_de:
        expected = torch.zeros(m, n_max, k_max, dtype=torch.float64)
        expected[:, :n_out, :n_in] = beta64.t()[:, :, None] * g64[None]
        assert_close(d_experts, expected, dtype, "d_experts")
        outside = torch.ones(m, n_max, k_max, dtype=torch.bool)
        outside[:, :n_out, :n_in] = False
        assert (d_experts[outside] == 0).all(), "d_experts outside the slice must be exactly 0"
    if want_dbeta:
        expected = torch.einsum("ok,iok->oi", g64, e64[:, :n_out, :n_in])
        if bias_kind == "expert":
            expected += s64[:, None] * bias.double()[:, :n_out].t()
        assert_close(d_beta, expected, dtype, "d_beta")
    if want_dbias:
        expected = torch.zeros(bias.shape, dtype=torch.float64)
        if bias.dim() == 1:
            expected[:n_out] = s64
        else:
            expected[:, :n_out] = beta64.t() * s64
        assert_close(d_bias, expected, dtype, "d_bias")
    if want_weight:  # the same values as the combine kernel's, which the forward used
        combined = nan_like((n_out, n_in), dtype)
        no_bias = bias_struct(None)
        assert lib.mos_emulate_combine(DTYPE_CODES[dtype], ctypes.byref(mix),
                                       ctypes.byref(no_bias), ptr(combined), ptr(None)) == 0
        assert torch.equal(weight, combined), "W_a differs from the combine kernel's"
        assert_close(weight, torch.einsum("oi,iok->ok", beta64, e64[:, :n_out, :n_in]), dtype,
                     "W_a")



@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weight_grad_from_broadcast_gradients(lib, shape, dtype):
    """save_mixed_weight's backward (mos_combine_backward) hands the epilogue autograd's
    gradients of W_a and b_a as they come, which may be broadcast (stride 0), with b_a's
    gradient as a one-row dy."""
    n_out, n_in, n_max, k_max, m = shape
    experts, beta, bias, _ = make(shape, "contiguous", False, "expert", dtype)
    product = torch.tensor(0.75, dtype=dtype).expand(n_out, n_in)
    dy = torch.tensor(-1.5, dtype=dtype).expand(n_out).view(1, n_out)
    d_experts, d_beta = nan_like((m, n_max, k_max), dtype), nan_like((n_out, m), dtype)
    d_bias = nan_like((m, n_max), dtype)
    assert lib.mos_emulate_weight_grad_from_product(
        DTYPE_CODES[dtype], ctypes.byref(matrix(product)), ctypes.byref(matrix(dy)),
        ctypes.byref(mixture(experts, beta, n_out, n_in)), ctypes.byref(bias_struct(bias)),
        ptr(d_experts), ptr(d_beta), ptr(d_bias), ptr(None)) == 0

    e64, beta64, b64 = experts.double(), beta.double(), bias.double()
    expected = torch.zeros(m, n_max, k_max, dtype=torch.float64)
    expected[:, :n_out, :n_in] = 0.75 * beta64.t()[:, :, None]
    assert_close(d_experts, expected, dtype, "d_experts")
    expected = 0.75 * e64[:, :n_out, :n_in].sum(2).t() - 1.5 * b64[:, :n_out].t()
    assert_close(d_beta, expected, dtype, "d_beta")
    expected = torch.zeros(m, n_max, dtype=torch.float64)
    expected[:, :n_out] = -1.5 * beta64.t()
    assert_close(d_bias, expected, dtype, "d_bias")
