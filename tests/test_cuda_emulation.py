"""The CUDA backend's elementwise kernels (csrc/cuda/mos_linear_elementwise.cuh: W_a's combine, the
experts' gradient from cuBLAS's G with the dbeta partials and W_a for dx, the column sums of dy,
dbeta and dbias) run on the CPU, unit by unit over the kernels' own grid (tests/cuda_emulation.cpp),
against the float64 reference. The emulation also counts the elements each access path moves: on
rows that start 16-byte aligned (stride 1) whole 16-byte slots must take the 16-byte path and only
a row's partial last slot may go element by element; unaligned and strided rows go element by
element throughout, with the same results bit for bit. The pipelined one-pass forward / dx kernels
(csrc/cuda/mos_linear_pipeline.cuh) run block by block too, with ldmatrix and mma.sync emulated per
lane (tests at the end of this file). Needs nvcc for the CUDA headers, no GPU."""
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
    lib = ctypes.CDLL(str(out))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mos_emulate_take_counts.argtypes = [ctypes.POINTER(i64)]
    lib.mos_emulate_decomposition.argtypes = [i32, p, i64, ctypes.POINTER(i64)]
    lib.mos_emulate_combine.argtypes = [i32, p, p, p, i64, p]
    lib.mos_emulate_weight_grad_from_product.argtypes = [i32, p, p, p, p, p, p, p, p, i64]
    lib.mos_emulate_one_pass.argtypes = [i32, i32, p, p, p, p, ctypes.POINTER(i64)]
    return lib


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


def take_counts(lib):
    """Since the last call: ((elements moved 16 bytes at a time, one by one), (units that took
    the 16-byte path, units that went slot by slot))."""
    counts = (ctypes.c_int64 * 4)()
    lib.mos_emulate_take_counts(counts)
    return (counts[0], counts[1]), (counts[2], counts[3])


def vec(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


# (n_out, n_in, n_max, k_max, m): odd and round sizes, m in {1, 2, 3, 6}; n_in from the MT and
# BERT spaces (640, 120 and 540 of 768, 768 of a padded 776); rows of fewer slots than a unit
# has (1, 33), several units a row with a partial last one (127, 1030, 540).
SHAPES = [(1, 1, 1, 8, 1), (7, 33, 9, 40, 3), (33, 127, 40, 136, 2), (5, 1030, 7, 1040, 2),
          (3, 2048, 3, 2048, 6), (4, 520, 6, 1100, 2), (16, 40, 24, 48, 2), (3, 640, 4, 640, 2),
          (6, 120, 8, 768, 3), (2, 540, 3, 768, 1), (5, 768, 5, 776, 6)]
# Where each tensor lives, as (experts, G and dy, W_a and d_experts):
#   contiguous: as the binding passes them (W_a rows n_in apart);
#   aligned_rows: W_a's and G's rows padded to 16 bytes (a row stride rounded up);
#   offset: every tensor one element past a 16-byte boundary (views into a larger buffer);
#   padded: rows one element longer (the experts' k_max + 1 apart, G's n_in + 1, dy's n_out + 1),
#     so most of them start unaligned;
#   transposed: experts, G and dy with a column stride other than 1.
LAYOUTS = {"contiguous": ("contiguous", "contiguous", "contiguous"),
           "aligned_rows": ("contiguous", "padded16", "padded16"),
           "offset": ("offset", "offset", "offset"),
           "padded": ("padded", "padded", "contiguous"),
           "transposed": ("transposed", "transposed", "contiguous")}
MIXES = [(False, "expert"), (True, "shared"), (False, "none")]  # (layer-wise, bias)


def place(values, where, dtype):
    """values (any shape, last dimension the row) cast to dtype and stored `where`; the same
    values whatever `where` is. NaN wherever the view does not reach."""
    values = values.to(dtype)
    *lead, cols = values.shape
    if where == "contiguous":
        return values.contiguous()
    if where == "transposed":
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if where in ("padded", "padded16"):
        width = cols + 1 if where == "padded" else -(-cols // vec(dtype)) * vec(dtype)
        buffer = torch.full((*lead, width), float("nan"), dtype=dtype)
        buffer[..., :cols] = values
        return buffer[..., :cols]
    assert where == "offset"
    buffer = torch.full((values.numel() + 1,), float("nan"), dtype=dtype)
    view = buffer[1:].view(values.shape)
    view.copy_(values)
    return view


def nan_output(shape, where, dtype):
    return place(torch.full(shape, float("nan")), where, dtype)


def make(shape, layout, layerwise, bias_kind, dtype, seed=0):
    n_out, n_in, n_max, k_max, m = shape
    where_e, where_g, _ = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    experts = place(torch.randn(m, n_max, k_max, generator=g), where_e, dtype)
    if layerwise:  # one score per expert, broadcast over rows with stride 0
        beta = torch.randn(m, generator=g).softmax(-1).to(dtype).expand(n_out, m)
    else:
        beta = torch.randn(n_out, m, generator=g).softmax(-1).to(dtype)
    bias = {"none": None, "shared": torch.randn(n_max, generator=g),
            "expert": torch.randn(m, n_max, generator=g)}[bias_kind]
    product = place(torch.randn(n_out, n_in, generator=g), where_g, dtype)
    return experts, beta, None if bias is None else bias.to(dtype), product


def make_dy(tokens, n_out, layout, dtype):
    """The cotangent dy (tokens, n_out), stored like G."""
    g = torch.Generator().manual_seed(2)
    where = LAYOUTS[layout][1]
    return place(torch.randn(tokens, n_out, generator=g), "contiguous" if where == "padded16"
                 else where, dtype)


def row_counts(data_ptr, row_stride, col_stride, rows, cols, dtype):
    """(vector, scalar) elements for accessing `cols` columns of each row: whole 16-byte slots of
    rows that start 16-byte aligned with column stride 1 take the 16-byte path, the rest (a
    partial last slot; every element of other rows) go one by one."""
    size, width = torch.empty((), dtype=dtype).element_size(), vec(dtype)
    vector = scalar = 0
    for r in range(rows):
        if col_stride == 1 and (data_ptr + r * row_stride * size) % 16 == 0:
            vector += cols // width * width
            scalar += cols % width
        else:
            scalar += cols
    return vector, scalar


def add(a, b):
    return a[0] + b[0], a[1] + b[1]


def aligned(t, offset_elements=0):
    return (t.data_ptr() + offset_elements * t.element_size()) % 16 == 0


def units(total, fast_row, partial):
    """(16-byte, slot-by-slot) units of a row of `total` units: all go slot by slot on a row
    whose accesses are not all aligned, else only the unit that holds a partial last slot."""
    slow = total if not fast_row else int(partial and total > 0)
    return total - slow, slow


def slice_units(n_in, dtype):
    """Units over a row's n_in columns: 4 whole slots a unit, then one for a partial slot."""
    whole, partial = divmod(n_in, vec(dtype))
    return -(-whole // 4) + (partial > 0), partial > 0


def experts_aligned(experts, o, dtype):
    """The kernels' test for every expert's row o at once."""
    return (experts.stride(2) == 1 and experts.stride(0) % vec(dtype) == 0
            and aligned(experts, o * experts.stride(1)))


def expected_combine_units(experts, n_out, n_in, dtype):
    total, (count, partial) = (0, 0), slice_units(n_in, dtype)
    for o in range(n_out):  # W_a's misaligned rows take element-by-element stores on the way
        total = add(total, units(count, experts_aligned(experts, o, dtype), partial))
    return total


def expected_grad_units(product, experts, outputs, n_out, n_in, dtype):
    """Slice units of rows < n_out, then (with d_experts) the units over zeros of every row."""
    d_experts, d_beta, _, weight = outputs
    m, n_max, k_max = experts.shape
    width, total = vec(dtype), (0, 0)
    if d_experts is None and d_beta is None and weight is None:
        return total  # dbias alone: no unit runs
    in_slots, all_slots = -(-n_in // width), -(-k_max // width)
    grads_aligned = lambda o: (n_max * k_max % width == 0 and  # noqa: E731
                               aligned(d_experts, o * k_max))
    for o in range(n_out):
        fast = ((d_experts is None and d_beta is None) or
                (product.stride(1) == 1 and aligned(product, o * product.stride(0))))
        fast = fast and (d_beta is None and weight is None or experts_aligned(experts, o, dtype))
        fast = fast and (d_experts is None or grads_aligned(o))
        fast = fast and (weight is None or aligned(weight, o * weight.stride(0)))
        count, partial = slice_units(n_in, dtype)
        total = add(total, units(count, fast, partial))
    if d_experts is not None:
        for o in range(n_max):
            zeros = all_slots - in_slots if o < n_out else all_slots
            total = add(total, units(-(-zeros // 4), grads_aligned(o), k_max % width))
    return total


def expert_counts(experts, n_out, n_in, dtype):
    total = (0, 0)
    for i in range(experts.shape[0]):
        total = add(total, row_counts(experts.data_ptr() + i * experts.stride(0) *
                                      experts.element_size(), experts.stride(1),
                                      experts.stride(2), n_out, n_in, dtype))
    return total


def grad_row_counts(d_experts, rows, dtype):
    """d_experts' rows 0..rows-1 of every expert, all k_max columns."""
    m, n_max, k_max = d_experts.shape
    total = (0, 0)
    for i in range(m):
        total = add(total, row_counts(d_experts.data_ptr() + i * n_max * k_max *
                                      d_experts.element_size(), k_max, 1, rows, k_max, dtype))
    return total


def check_untouched(buffer_view, where, name):
    """The NaN padding around an output view is still NaN: nothing was written past its rows."""
    if where == "padded16":
        base = buffer_view.as_strided((buffer_view.shape[0], buffer_view.stride(0)),
                                      buffer_view.stride())
        assert base[:, buffer_view.shape[1]:].isnan().all(), f"{name}: written past n_in"
    elif where == "offset":
        before = buffer_view.as_strided((1,), (1,), buffer_view.storage_offset() - 1)
        assert before.isnan().all(), f"{name}: written before the first element"


def run_combine(lib, experts, beta, bias, n_out, n_in, where, dtype):
    weight = nan_output((n_out, n_in), where, dtype)
    mixed = torch.full((n_out,), float("nan"), dtype=dtype) if bias is not None else None
    mix = mixture(experts, beta, n_out, n_in)
    take_counts(lib)
    assert lib.mos_emulate_combine(DTYPE_CODES[dtype], ctypes.byref(mix),
                                   ctypes.byref(bias_struct(bias)), ptr(weight),
                                   weight.stride(0), ptr(mixed)) == 0
    return weight, mixed, take_counts(lib)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("layerwise,bias_kind", MIXES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_combine(lib, shape, layout, layerwise, bias_kind, dtype):
    n_out, n_in = shape[:2]
    where_w = LAYOUTS[layout][2]
    experts, beta, bias, _ = make(shape, layout, layerwise, bias_kind, dtype)
    weight, mixed, (counts, unit_paths) = run_combine(lib, experts, beta, bias, n_out, n_in,
                                                      where_w, dtype)

    e64, beta64 = experts.double()[:, :n_out, :n_in], beta.double()
    assert_close(weight, torch.einsum("oi,iok->ok", beta64, e64), dtype, "W_a")
    check_untouched(weight, where_w, "W_a")
    if bias is not None:
        b64 = bias.double()
        expected = b64[:n_out] if bias.dim() == 1 else (beta64 * b64[:, :n_out].t()).sum(1)
        assert_close(mixed, expected, dtype, "b_a")
    expected = add(expert_counts(experts, n_out, n_in, dtype),
                   row_counts(weight.data_ptr(), weight.stride(0), 1, n_out, n_in, dtype))
    assert counts == expected, f"(16-byte, one by one) elements: {counts}, expected {expected}"
    expected = expected_combine_units(experts, n_out, n_in, dtype)
    assert unit_paths == expected, f"(16-byte, slot-by-slot) units: {unit_paths} != {expected}"


# (d_experts, d_beta, d_bias, W_a): the backward asks for W_a with the weight gradients when dx is
# wanted too.
NEEDS = [(True, True, True, True), (True, False, False, False), (False, True, False, True),
         (False, False, True, False), (False, False, False, True)]
# (layer-wise, bias, needs, tokens): dbias alone only where there is a bias; several token counts
# (column sums take 32 rows or more a part) where the column sums of dy are needed (dbias, or
# dbeta with a per-expert bias), one where dy is not read.
GRAD_CASES = [(layerwise, bias, needs, tokens) for layerwise, bias in MIXES for needs in NEEDS
              if any(needs[:2]) or needs[3] or bias != "none"
              for tokens in ([1, 64, 200] if needs[2] and bias != "none" or
                             needs[1] and bias == "expert" else [1])]


def run_weight_grad(lib, product, dy, experts, beta, bias, n_out, n_in, needs, where, dtype):
    """The emulated epilogue's outputs (None where not asked for) and its access counts."""
    want_de, want_dbeta, want_dbias, want_weight = needs
    m, n_max, k_max = experts.shape
    # d_experts is contiguous by contract: off alignment as a whole, or not at all.
    d_experts = (nan_output((m, n_max, k_max), "offset" if where == "offset" else "contiguous",
                            dtype) if want_de else None)
    d_beta = torch.full((n_out, m), float("nan"), dtype=dtype) if want_dbeta else None
    d_bias = torch.full(bias.shape, float("nan"), dtype=dtype) if want_dbias else None
    weight = nan_output((n_out, n_in), where, dtype) if want_weight else None
    mix = mixture(experts, beta, n_out, n_in)
    take_counts(lib)
    assert lib.mos_emulate_weight_grad_from_product(
        DTYPE_CODES[dtype], ctypes.byref(matrix(product)), ctypes.byref(matrix(dy)),
        ctypes.byref(mix), ctypes.byref(bias_struct(bias)), ptr(d_experts), ptr(d_beta),
        ptr(d_bias), ptr(weight), weight.stride(0) if weight is not None else n_in) == 0
    return (d_experts, d_beta, d_bias, weight), take_counts(lib)


def expected_grad_counts(product, experts, outputs, n_out, n_in, dtype):
    """What each access path should move: G's rows (for dE or dbeta), the experts' (for dbeta or
    W_a), every row of d_experts (zeros included), W_a's."""
    d_experts, d_beta, _, weight = outputs
    total = (0, 0)
    if d_experts is not None or d_beta is not None:
        total = add(total, row_counts(product.data_ptr(), product.stride(0), product.stride(1),
                                      n_out, n_in, dtype))
    if d_beta is not None or weight is not None:
        total = add(total, expert_counts(experts, n_out, n_in, dtype))
    if d_experts is not None:
        total = add(total, grad_row_counts(d_experts, experts.shape[1], dtype))
    if weight is not None:
        total = add(total, row_counts(weight.data_ptr(), weight.stride(0), 1, n_out, n_in, dtype))
    return total


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("layerwise,bias_kind,needs,tokens", GRAD_CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weight_grad_from_product(lib, shape, layout, layerwise, bias_kind, needs, tokens, dtype):
    want_de, want_dbeta, want_dbias, want_weight = needs
    needs = (want_de, want_dbeta, want_dbias and bias_kind != "none", want_weight)
    n_out, n_in, n_max, k_max, m = shape
    where = LAYOUTS[layout][2]
    experts, beta, bias, product = make(shape, layout, layerwise, bias_kind, dtype)
    dy = make_dy(tokens, n_out, layout, dtype)
    outputs, (counts, unit_paths) = run_weight_grad(lib, product, dy, experts, beta, bias,
                                                    n_out, n_in, needs, where, dtype)
    d_experts, d_beta, d_bias, weight = outputs

    e64, beta64, g64, s64 = experts.double(), beta.double(), product.double(), dy.double().sum(0)
    if d_experts is not None:
        expected = torch.zeros(m, n_max, k_max, dtype=torch.float64)
        expected[:, :n_out, :n_in] = beta64.t()[:, :, None] * g64[None]
        assert_close(d_experts, expected, dtype, "d_experts")
        outside = torch.ones(m, n_max, k_max, dtype=torch.bool)
        outside[:, :n_out, :n_in] = False
        assert (d_experts[outside] == 0).all(), "d_experts outside the slice must be exactly 0"
        if where == "offset":
            check_untouched(d_experts.view(m * n_max, k_max), where, "d_experts")
    if d_beta is not None:
        expected = torch.einsum("ok,iok->oi", g64, e64[:, :n_out, :n_in])
        if bias_kind == "expert":
            expected += s64[:, None] * bias.double()[:, :n_out].t()
        assert_close(d_beta, expected, dtype, "d_beta")
    if d_bias is not None:
        expected = torch.zeros(bias.shape, dtype=torch.float64)
        if bias.dim() == 1:
            expected[:n_out] = s64
        else:
            expected[:, :n_out] = beta64.t() * s64
        assert_close(d_bias, expected, dtype, "d_bias")
    if weight is not None:  # the same values as the combine kernel's, which the forward used
        combined, _, _ = run_combine(lib, experts, beta, None, n_out, n_in, where, dtype)
        assert torch.equal(weight, combined), "W_a differs from the combine kernel's"
        assert_close(weight, torch.einsum("oi,iok->ok", beta64, e64[:, :n_out, :n_in]), dtype,
                     "W_a")
        check_untouched(weight, where, "W_a")
    expected = expected_grad_counts(product, experts, outputs, n_out, n_in, dtype)
    assert counts == expected, f"(16-byte, one by one) elements: {counts}, expected {expected}"
    expected = expected_grad_units(product, experts, outputs, n_out, n_in, dtype)
    assert unit_paths == expected, f"(16-byte, slot-by-slot) units: {unit_paths} != {expected}"


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] % 8 == 0 and s[3] % 8 == 0],
                         ids=str)
def test_every_element_takes_16_bytes_when_rows_allow(lib, shape, dtype):
    """n_in and k_max multiples of 16 bytes, contiguous aligned tensors (the binding's case):
    no element goes one by one and every unit takes the unrolled 16-byte path, in the combine
    and in the full backward epilogue."""
    n_out, n_in = shape[:2]
    experts, beta, bias, product = make(shape, "contiguous", False, "expert", dtype)
    _, _, (counts, unit_paths) = run_combine(lib, experts, beta, bias, n_out, n_in,
                                             "contiguous", dtype)
    assert counts[1] == 0 and counts[0] > 0 and unit_paths[1] == 0, (counts, unit_paths)
    dy = make_dy(3, n_out, "contiguous", dtype)
    _, (counts, unit_paths) = run_weight_grad(lib, product, dy, experts, beta, bias, n_out, n_in,
                                              (True, True, True, True), "contiguous", dtype)
    assert counts[1] == 0 and counts[0] > 0 and unit_paths[1] == 0, (counts, unit_paths)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_paths_agree_bit_for_bit(lib, shape, dtype):
    """The same values through the 16-byte path (aligned rows) and element by element (every
    tensor one element off alignment): identical outputs, since both add in the same order."""
    n_out, n_in = shape[:2]
    results = []
    for layout in ("aligned_rows", "offset"):
        experts, beta, bias, product = make(shape, layout, False, "expert", dtype)
        dy = make_dy(5, n_out, layout, dtype)
        weight, mixed, _ = run_combine(lib, experts, beta, bias, n_out, n_in,
                                       LAYOUTS[layout][2], dtype)
        outputs, _ = run_weight_grad(lib, product, dy, experts, beta, bias, n_out, n_in,
                                     (True, True, True, True), LAYOUTS[layout][2], dtype)
        results.append([weight, mixed, *outputs])
    for name, a, b in zip(["W_a", "b_a", "d_experts", "d_beta", "d_bias", "W_a (epilogue)"],
                          *results):
        assert torch.equal(a, b), f"{name} differs between the two paths"


def test_decomposition(lib):
    """The work decomposition the header argues for: a 512 x 640 fp16 layer spreads over more
    blocks than an H100 has SMs (132), and a 3072 x 768 one keeps four slots a thread."""
    out = (ctypes.c_int64 * 4)()
    for (n_out, n_in), blocks in [((512, 640), 160), ((3072, 768), 1152)]:
        experts = torch.zeros(2, n_out, n_in, dtype=torch.float16)
        beta = torch.zeros(n_out, 2, dtype=torch.float16)
        mix = mixture(experts, beta, n_out, n_in)
        assert lib.mos_emulate_decomposition(0, ctypes.byref(mix), 2048, out) == 0
        units, threads, partials, sum_rows = out
        assert units == n_out * -(-n_in // 32) and units // threads == blocks
        assert partials == -(-n_in // 32)  # dbeta partials a row: one per unit
        assert sum_rows % 8 == 0 and 32 <= sum_rows <= 512
    assert blocks >= 132


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
    (d_experts, d_beta, d_bias, _), _ = run_weight_grad(
        lib, product, dy, experts, beta, bias, n_out, n_in, (True, True, True, False),
        "contiguous", dtype)

    e64, beta64, b64 = experts.double(), beta.double(), bias.double()
    expected = torch.zeros(m, n_max, k_max, dtype=torch.float64)
    expected[:, :n_out, :n_in] = 0.75 * beta64.t()[:, :, None]
    assert_close(d_experts, expected, dtype, "d_experts")
    expected = 0.75 * e64[:, :n_out, :n_in].sum(2).t() - 1.5 * b64[:, :n_out].t()
    assert_close(d_beta, expected, dtype, "d_beta")
    expected = torch.zeros(m, n_max, dtype=torch.float64)
    expected[:, :n_out] = -1.5 * beta64.t()
    assert_close(d_bias, expected, dtype, "d_bias")


# ------------------------------------------------------------------------------ pipelined one pass
# The pipelined forward / input-grad kernels (csrc/cuda/mos_linear_pipeline.cuh) emulated block by
# block (tests/cuda_emulation.cpp): each thread's staging and fp32 mixing of a step, the schedule
# and its double buffer, the swizzled stages, the lanes' ldmatrix rows and the accumulator map,
# with ldmatrix and mma.sync emulated per lane; the output against the float64 reference.

# (tokens, n_out, n_in, n_max, k_max, x's row padding): odd and round sizes; partial last depth
# steps of whole chunks (72, 136, 264) and of a partial chunk (100 in x rows padded to 104);
# several token and column tiles; a depth of one step (32); one of less than a step (1).
PIPELINE_SHAPES = [(37, 67, 72, 70, 80, 0), (130, 72, 100, 80, 104, 4), (129, 72, 96, 72, 96, 0),
                   (1, 1, 1, 1, 8, 0), (200, 136, 264, 140, 272, 0), (64, 64, 64, 64, 64, 0),
                   (40, 16, 32, 16, 32, 0), (77, 33, 40, 40, 48, 0)]


def pipeline_variant(act, experts, beta, n_in, input_grad):
    """The kernel pl::variant picks: 2, 4 or 8 held experts when every row loads 16 bytes at a
    time (and, for dx, n_in is whole chunks and beta's experts contiguous), else 0 (the general
    kernel)."""
    def rows_aligned(t, row_stride):
        return t.stride(-1) == 1 and row_stride % 8 == 0 and t.data_ptr() % 16 == 0
    m = experts.shape[0]
    fast = (rows_aligned(act, act.stride(0)) and rows_aligned(experts, experts.stride(1))
            and experts.stride(0) % 8 == 0 and m <= 8
            and (not input_grad or (n_in % 8 == 0 and beta.stride(1) == 1)))
    return 0 if not fast else 2 if m <= 2 else 4 if m <= 4 else 8


def emulate_one_pass(lib, act, experts, beta, bias, n_out, n_in, input_grad, dtype):
    tokens = act.shape[0]
    out = torch.full((tokens, n_in if input_grad else n_out), float("nan"), dtype=dtype)
    info = (ctypes.c_int64 * 5)()
    status = lib.mos_emulate_one_pass(DTYPE_CODES[dtype], int(input_grad),
                                      ctypes.byref(matrix(act)),
                                      ctypes.byref(mixture(experts, beta, n_out, n_in)),
                                      ctypes.byref(bias_struct(bias)), ptr(out), info)
    assert status == 0
    return out, dict(zip(("variant", "hazards", "ldmatrix_conflicts", "store_conflicts",
                          "bad_rows"), info))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("input_grad", [False, True], ids=["forward", "dx"])
@pytest.mark.parametrize("layout", ["aligned", "offset"])
@pytest.mark.parametrize("m", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", PIPELINE_SHAPES, ids=str)
def test_pipelined_one_pass(lib, shape, m, layout, input_grad, dtype):
    check_pipelined(lib, shape, m, layout, input_grad, dtype)


@pytest.mark.parametrize("input_grad", [False, True], ids=["forward", "dx"])
@pytest.mark.parametrize("shape", [PIPELINE_SHAPES[2], PIPELINE_SHAPES[4]], ids=str)
def test_pipelined_one_pass_more_experts_than_held(lib, shape, input_grad):
    """m = 9 > 8: the general kernel, on aligned rows too."""
    check_pipelined(lib, shape, 9, "aligned", input_grad, torch.float16)


def check_pipelined(lib, shape, m, layout, input_grad, dtype):
    tokens, n_out, n_in, n_max, k_max, pad = shape
    g = torch.Generator().manual_seed(m * 1000 + tokens)
    where = "contiguous" if layout == "aligned" else "offset"
    experts = place(torch.randn(m, n_max, k_max, generator=g) / n_in ** 0.5, where, dtype)
    layerwise = m == 3  # one case of a stride-0 beta
    beta = (torch.randn(m, generator=g).softmax(-1).to(dtype).expand(n_out, m) if layerwise
            else torch.randn(n_out, m, generator=g).softmax(-1).to(dtype))
    bias = None
    if not input_grad:
        bias = (torch.randn(m, n_max, generator=g) if m != 2 else
                torch.randn(n_max, generator=g)).to(dtype)
    depth = n_out if input_grad else n_in
    values = torch.randn(tokens, depth, generator=g)
    if layout == "offset":
        act = place(values, "offset", dtype)
    else:  # x's rows padded as the shape says; dy contiguous
        act = place(torch.nn.functional.pad(values, (0, 0 if input_grad else pad)), "contiguous",
                    dtype)[:, :depth]
    out, info = emulate_one_pass(lib, act, experts, beta, bias, n_out, n_in, input_grad, dtype)

    assert info["variant"] == pipeline_variant(act, experts, beta, n_in, input_grad), info
    assert info["hazards"] == 0 and info["bad_rows"] == 0, info
    # The swizzle keeps every ldmatrix phase and staging store free of bank conflicts.
    assert info["ldmatrix_conflicts"] == 0 and info["store_conflicts"] == 0, info
    weight = torch.einsum("oi,iok->ok", beta.double(), experts.double()[:, :n_out, :n_in])
    if input_grad:
        expected = act.double() @ weight
    else:
        expected = act.double() @ weight.t()
        if bias is not None:
            b64 = bias.double()
            expected += (b64[:n_out] if bias.dim() == 1
                         else (beta.double() * b64[:, :n_out].t()).sum(1))
    assert_close(out, expected, dtype, "dx" if input_grad else "y")


def test_pipelined_one_pass_takes_the_fast_kernels(lib):
    """The aligned shapes above run the fast kernels (so the main loop's unmasked loads are
    what the reference checked), in both directions where dx's n_in is whole chunks."""
    seen = set()
    for tokens, n_out, n_in, n_max, k_max, _ in PIPELINE_SHAPES:
        for m in (1, 3, 6):
            experts = torch.zeros(m, n_max, k_max, dtype=torch.float16)
            beta = torch.zeros(n_out, m, dtype=torch.float16)
            for input_grad in (False, True):
                act = torch.zeros(tokens, n_out if input_grad else n_in, dtype=torch.float16)
                seen.add((input_grad, pipeline_variant(act, experts, beta, n_in, input_grad)))
    assert {(False, 2), (False, 4), (False, 8), (True, 2), (True, 4), (True, 8)} <= seen
