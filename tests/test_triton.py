"""What is specific to the Triton backend: both strategies against the float64 reference,
bit-reproducible gradients, the layer-wise stride-0 path, the strategy rule, partial gradients.
On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py)."""
import pytest
import torch

import mos_kernels
from oracle import DEVICE, assert_close, make_inputs, reference64, relative_mix64, run

pytestmark = pytest.mark.skipif("triton" not in mos_kernels.available_backends(DEVICE),
                                reason="the triton backend cannot run here")

from mos_kernels.backends import triton_backend  # noqa: E402

DTYPES = {"cpu": [torch.float32, torch.float64], "cuda": [torch.float32, torch.float16,
                                                         torch.bfloat16]}[DEVICE.type]
# On a GPU DTYPES has them already; on CPU this runs them through the interpreter.
HALF = [torch.float16, torch.bfloat16] if DEVICE.type == "cpu" else []


@pytest.fixture(params=["one_pass", "one_pass-unswapped", "combine"])
def strategy(request, monkeypatch):
    """The strategy; under the interpreter "one_pass-unswapped" runs the one-pass kernels in
    the form sm_80 compiles (SWAP off, see triton_backend._forward_kernel), "one_pass" in the
    form sm_90 compiles. On a GPU the device decides: the unswapped case is skipped."""
    if request.param == "one_pass-unswapped":
        if DEVICE.type != "cpu":
            pytest.skip("the GPU's compute capability picks the form")
        monkeypatch.setattr(triton_backend, "_INTERPRETER_SWAP", False)
        return "one_pass"
    return request.param


@pytest.fixture(params=["one_pass", "combine"])
def either(request):
    """The strategy, for tests whose one-pass path does not depend on the kernels' form."""
    return request.param


def triton_op(strategy):
    def op(x, experts, beta, bias, out_features):
        return mos_kernels.mos_linear(x, experts, beta, bias, out_features=out_features,
                                      backend="triton", strategy=strategy)
    return op


def check(shape, m, layerwise, bias_kind, dtype, strategy):
    tokens, n_in, n_out, k_max, n_max = shape
    tensors = make_inputs(tokens, n_in, n_out, k_max, n_max, m, layerwise, bias_kind, dtype)
    y, grads, dy = run(triton_op(strategy), tensors, n_out)
    y_ref, grads_ref = reference64(tensors, n_out, dy)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "output")
    for name, g, g_ref in zip(["dx", "dexperts", "dbeta", "dbias"], grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == dtype, name
        assert_close(g, g_ref, dtype, name)
    assert not grads[1][:, n_out:].any() and not grads[1][:, :, n_in:].any()


# Several k tiles, token tiles and output tiles (tiles are 32 under the interpreter), odd edges.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, layerwise, bias_kind", [(2, False, "expert"), (3, True, "shared"),
                                                     (6, False, "none"), (1, True, "expert")])
def test_strategies_match_float64_reference(strategy, m, layerwise, bias_kind, dtype):
    check((70, 97, 65, 100, 66), m, layerwise, bias_kind, dtype, strategy)


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_inputs(strategy, dtype, layerwise):
    check((40, 70, 33, 72, 40), 2, layerwise, "expert", dtype, strategy)


if triton_backend.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _mix_kernel(E, Beta, W, N: tl.constexpr, M: tl.constexpr, DOT: tl.constexpr,
                    BETA_WORDS: tl.constexpr):
        """W = the one-pass kernels' mixed tile of an (N, N) slice, as they feed it to the dot
        (BETA_WORDS: Beta is beta's int32 view, as dx reads it on sm_90)."""
        r = tl.arange(0, N)
        offsets = r[:, None] * N + r[None, :]
        ok = r[:, None] < N
        row = M // 2 if BETA_WORDS else M
        w = triton_backend._mix_tile(E, offsets, ok, N * N, Beta, r[:, None] * row, ok, 1, M,
                                     DOT, BETA_WORDS)
        tl.store(W + offsets, w.to(W.dtype.element_ty))

    @triton.jit
    def _mix_relative_kernel(E, Beta, W, Scale, N: tl.constexpr, M: tl.constexpr,
                             DOT: tl.constexpr):
        """W = the one-pass forward's relative mixed tile of an (N, N) slice, as it feeds it to
        the dot, and Scale = the pivot's beta per row, which it multiplies into the output."""
        r = tl.arange(0, N)
        offsets = r[:, None] * N + r[None, :]
        pivot, scale = triton_backend._pivot(Beta + r * M, 1, r < N, M, tl.float32)
        w = triton_backend._mix_relative(E, offsets, r[:, None] < N, N * N, Beta + r * M, 1,
                                         pivot, scale, M, DOT, False, True)
        tl.store(W + offsets, w.to(W.dtype.element_ty))
        tl.store(Scale + r, scale)


def _round_once(v, dtype):
    """float64 v rounded to nearest (even) half dtype with one rounding: through fp32 rounded
    to odd, which has bits enough to make the second rounding exact (torch's own float64 ->
    half conversion goes through a round-to-nearest fp32)."""
    f = v.float()
    f = torch.where(f.double().abs() > v.abs(), torch.nextafter(f, torch.zeros_like(f)), f)
    inexact = f.double() != v
    f = (f.view(torch.int32) | inexact.int()).view(torch.float32)
    return f.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, words", [(1, False), (2, False), (2, True), (3, False), (6, False),
                                      (6, True)])
def test_half_mixing_rounds_every_step(dtype, m, words):
    """For half inputs the one-pass kernels mix in the input dtype (packed multiply-adds on a
    GPU): beta_0 E_0 rounded, then each further expert one fused multiply-add rounded to
    nearest. That is the contract (docs/design.md, section 5), checked on the mixed tile itself
    against a float64 model of it. Under the interpreter bf16 runs as fp32 rounded to bf16 by
    hand, which may round twice: 1-ulp differences are allowed in a few elements; the model
    that rounds once (fp32 mixing) differs in many. words: beta read as int32 words of two
    experts, as dx reads it on sm_90."""
    g = torch.Generator().manual_seed(m)
    n = 64
    experts = torch.randn(m, n, n, generator=g).to(dtype)
    beta = torch.randn(n, m, generator=g).softmax(-1).to(dtype)
    model = _round_once(beta[:, :1].double() * experts[0].double(), dtype)
    for i in range(1, m):
        model = _round_once(beta[:, i:i + 1].double() * experts[i].double() + model.double(),
                            dtype)
    mixed = torch.empty(n, n, dtype=dtype, device=DEVICE)
    beta_arg = beta.to(DEVICE).view(torch.int32) if words else beta.to(DEVICE)
    _mix_kernel[(1,)](experts.to(DEVICE), beta_arg, mixed, n, m,
                      triton_backend._types(dtype)[1], words)
    mixed = mixed.cpu()
    ulp = torch.finfo(dtype).eps * model.double().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((mixed.double() - model.double()).abs() <= ulp).all()
    assert (mixed != model).double().mean() <= 1e-3
    rounded_once = _round_once((beta.double().t()[:, :, None] * experts.double()).sum(0), dtype)
    assert m == 1 or (rounded_once != model).double().mean() > 0.05


def _edge_betas(n, m, dtype, g):
    """Rows of beta, softmax ones and every few rows one the pivot choice must get right: all
    zero, negative, tied, and one expert that takes almost everything (the others' ratio to it
    is tiny, theirs to it would overflow fp16)."""
    beta = torch.randn(n, m, generator=g).softmax(-1)
    edges = [torch.zeros(m), -torch.arange(1.0, m + 1) / m, torch.full((m,), 1.0 / m),
             torch.tensor([1e-6] * (m - 1) + [1.0 - 1e-6 * (m - 1)]), -beta[0]]
    for i, row in enumerate(edges):
        beta[3 * i + 1] = row
    return beta.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_relative_mixing_rounds_every_step(dtype, m):
    """The forward's mixing for m <= RELATIVE_MAX_EXPERTS: per weight row the pivot p is the
    expert of largest |beta|; the tile is E_p plus, for every other expert in order, one fused
    multiply-add of its ratio beta_i / beta_p (rounded to the input dtype from fp32's
    beta_i * (1 / beta_p)), each rounded to nearest; the dot's output is then scaled by beta_p.
    Checked on the tile against a float64 model, as test_half_mixing_rounds_every_step."""
    g = torch.Generator().manual_seed(10 + m)
    n = 64
    experts = torch.randn(m, n, n, generator=g).to(dtype)
    beta = _edge_betas(n, m, dtype, g)
    model, scale = relative_mix64(experts, beta, dtype, lambda v: _round_once(v, dtype))
    mixed = torch.empty(n, n, dtype=dtype, device=DEVICE)
    scales = torch.empty(n, dtype=torch.float32, device=DEVICE)
    _mix_relative_kernel[(1,)](experts.to(DEVICE), beta.to(DEVICE), mixed, scales, n, m,
                               triton_backend._types(dtype)[1])
    mixed = mixed.cpu()
    assert torch.equal(scales.cpu(), scale[:, 0])
    ulp = torch.finfo(dtype).eps * model.double().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((mixed.double() - model.double()).abs() <= ulp).all()
    assert (mixed != model.to(dtype)).double().mean() <= 1e-3


@pytest.mark.parametrize("dtype", DTYPES + HALF, ids=str)
def test_forward_with_edge_betas(strategy, dtype):
    """Beta rows that are zero, negative, tied or dominated by one expert (_edge_betas), through
    the op against the float64 reference: at m the forward mixes relative to a pivot expert,
    and at one m beyond (mixed as dx mixes)."""
    g = torch.Generator().manual_seed(4)
    for m in (1, 3, triton_backend.RELATIVE_MAX_EXPERTS + 1):
        x, experts, _, bias = make_inputs(37, 45, 33, 50, 40, m, False, "expert", dtype)
        beta = _edge_betas(33, m, dtype, g).to(DEVICE).requires_grad_(True)
        tensors = [x, experts, beta, bias]
        y, grads, dy = run(triton_op(strategy), tensors, 33)
        y_ref, grads_ref = reference64(tensors, 33, dy)
        assert_close(y, y_ref, dtype, f"output, m = {m}")
        assert not y[:, 1].any()  # beta's row 1 is zero, and so are its outputs
        for name, grad, ref in zip(["dx", "dexperts", "dbeta", "dbias"], grads, grads_ref):
            assert_close(grad, ref, dtype, f"{name}, m = {m}")


def test_bf16_outputs_round_to_nearest(strategy):
    """Every bf16 store rounds to nearest even, as a GPU's conversion does (the interpreter's
    truncates: triton_backend._stored rounds by hand there). At m = 1 the output and dx are a
    scaled expert's products summed in fp32, so nearly all of their elements must equal the
    float64 reference rounded to bf16; truncated, about half would be one ulp below."""
    tensors = make_inputs(64, 96, 48, 96, 48, 1, False, "none", torch.bfloat16)
    y, grads, dy = run(triton_op(strategy), tensors, 48)
    y_ref, grads_ref = reference64(tensors, 48, dy)
    for name, got, ref in (("output", y, y_ref), ("dx", grads[0], grads_ref[0])):
        agree = (got.cpu() == ref.to(torch.bfloat16)).double().mean().item()
        assert agree > 0.9, f"{name}: {agree:.2f} of the elements rounded as float64 rounds"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dx_reads_beta_as_words_where_it_can(dtype, monkeypatch):
    """In the SWAP form dx reads a contiguous half beta with an even m as int32 words (two
    experts each, _Dims.beta_words), otherwise as it is; both give the same bits."""
    flags = []
    launch = triton_backend._GRAD_INPUT.launch
    monkeypatch.setattr(triton_backend._GRAD_INPUT, "launch",
                        lambda d, f, *a: flags.append(f) or launch(d, f, *a))
    x, experts, beta = (t.detach() for t in make_inputs(
        37, 45, 33, 50, 40, 4, False, "none", dtype))
    dy = torch.randn(37, 33, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    needs = [True, False, False, False]
    words = triton_backend.backward(dy, x, experts, beta, None, needs, "one_pass")[0]
    beta_t = beta.t().contiguous().t()  # same values, rows not contiguous
    plain = triton_backend.backward(dy, x, experts, beta_t, None, needs, "one_pass")[0]
    assert [f[2] for f in flags] == [triton_backend._swapped(beta.device), False]
    assert torch.equal(words, plain)


@pytest.mark.parametrize("layerwise", [False, True])
def test_gradients_are_bit_reproducible(strategy, layerwise):
    tensors = make_inputs(100, 130, 70, 140, 72, 3, layerwise, "expert", torch.float32)
    y1, first, dy = run(triton_op(strategy), tensors, 70)
    y2, second, _ = run(triton_op(strategy), tensors, 70, dy)
    assert torch.equal(y1, y2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_64_bit_offsets(strategy, monkeypatch):
    """The one-pass kernels' WIDE form (64-bit offsets, for tensors of 2^31 elements or more)
    computes what the 32-bit one does."""
    if strategy == "combine":
        pytest.skip("the combine kernels take no WIDE form")
    monkeypatch.setattr(triton_backend, "_wide", lambda t: True)
    check((70, 97, 65, 100, 66), 2, False, "expert", DTYPES[0], strategy)


def test_layerwise_stride0_beta_and_strided_inputs(strategy):
    """The backend reads beta, experts, bias and dy through their strides: an expanded
    (row stride 0) beta and transposed views give what contiguous copies give; exactly so in
    the one-pass kernels (torch.mm may round differently for another layout of dy)."""
    x, experts, beta, bias = (t.detach() for t in make_inputs(
        37, 45, 33, 50, 40, 3, True, "expert", torch.float32))
    beta_rows = beta.expand(33, 3)
    assert beta_rows.stride(0) == 0
    experts_t = experts.transpose(1, 2).contiguous().transpose(1, 2)  # stride (., 1, K_max)
    bias_t = bias.t().contiguous().t()
    dy = torch.randn(33, 37, generator=torch.Generator().manual_seed(3)).to(DEVICE).t()
    assert dy.stride() == (1, 37)
    needs = [True, True, True, True]
    y = triton_backend.forward(x, experts_t, beta_rows, bias_t, strategy)
    grads = triton_backend.backward(dy, x, experts_t, beta_rows, bias_t, needs, strategy)
    y_c = triton_backend.forward(x, experts, beta_rows.contiguous(), bias, strategy)
    grads_c = triton_backend.backward(dy.contiguous(), x, experts, beta_rows.contiguous(), bias,
                                      needs, strategy)
    for name, a, b in zip(["output", "dx", "dexperts", "dbeta", "dbias"], (y,) + grads,
                          (y_c,) + grads_c):
        assert a.is_contiguous(), name
        if strategy == "one_pass":
            assert torch.equal(a, b), name
        else:
            assert_close(a, b.double(), torch.float32, name)
    # and through the op, layer-wise dbeta is the column sum of the (n_out, m) rows
    tensors = [t.requires_grad_(True) for t in (x, experts, beta, bias)]
    _, op_grads, _ = run(triton_op(strategy), tensors, 33, dy)
    _, ref_grads = reference64(tensors, 33, dy)
    assert op_grads[2].shape == (3,)
    assert_close(op_grads[2], ref_grads[2], torch.float32, "dbeta")


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True),
                                   (False, True, True, False), (True, False, True, True)],
                         ids=lambda n: "".join("1" if b else "0" for b in n))
@pytest.mark.parametrize("bias_kind", ["shared", "expert"])
def test_only_requested_gradients(either, needs, bias_kind):
    strategy = either
    x, experts, beta, bias = (t.detach() for t in make_inputs(
        35, 40, 33, 41, 36, 2, False, bias_kind, torch.float32))
    dy = torch.randn(35, 33, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    full = triton_backend.backward(dy, x, experts, beta, bias, [True] * 4, strategy)
    some = triton_backend.backward(dy, x, experts, beta, bias, list(needs), strategy)
    for need, g, g_full in zip(needs, some, full):
        if need:
            torch.testing.assert_close(g, g_full, rtol=1e-5, atol=1e-5)
        else:
            assert g is None


def _gpu_tiles():
    """Every tile shape the GPU autotuner can pick, as the interpreter's fixed tiles (a combine
    config's token tile does not matter: 32)."""
    if DEVICE.type != "cpu":
        return []
    configs = (triton_backend._GEMM_CONFIGS + triton_backend._WGRAD_CONFIGS
               + triton_backend._COMBINE_CONFIGS)
    tiles = [dict(BLOCK_T=c.kwargs.get("BLOCK_T", 32), BLOCK_N=c.kwargs["BLOCK_N"],
                  BLOCK_K=c.kwargs["BLOCK_K"]) for c in configs]
    return [t for i, t in enumerate(tiles) if t not in tiles[:i]]


@pytest.mark.parametrize("tiles", _gpu_tiles(), ids=lambda t: "T{BLOCK_T}-N{BLOCK_N}-K{BLOCK_K}"
                         .format(**t))
def test_every_gpu_tile_shape_under_the_interpreter(strategy, tiles, monkeypatch):
    # On a GPU the autotuner picks among these; here each one runs every kernel, on a shape with
    # ragged edges in every dimension and more than one 128-tile along each.
    monkeypatch.setattr(triton_backend, "_INTERPRETER_TILES", tiles)
    check((300, 270, 260, 280, 270), 3, False, "expert", torch.float32, strategy)


def test_zero_tokens(either):
    strategy = either
    x, experts, beta, bias = (t.detach() for t in make_inputs(
        1, 20, 17, 24, 20, 2, False, "expert", torch.float32))
    x = x[:0]
    y = triton_backend.forward(x, experts, beta, bias, strategy)
    assert y.shape == (0, 17)
    dx, de, dbeta, dbias = triton_backend.backward(y, x, experts, beta, bias, [True] * 4,
                                                   strategy)
    assert dx.shape == (0, 20) and de.shape == experts.shape and dbias.shape == bias.shape
    assert not de.any() and not dbeta.any() and not dbias.any()


def _roofline():
    """benchmarks/roofline.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "roofline.py")
    spec = importlib.util.spec_from_file_location("roofline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_strategy_rule_is_the_cost_models():
    """COMBINE_MIN_TOKENS is what benchmarks/roofline.py predicts (its --rule)."""
    assert triton_backend.COMBINE_MIN_TOKENS == _roofline().rule_table()


def test_strategy_rule(monkeypatch):
    table = {9: (None, 4096, 2048), 8: (8192, 1024, 512)}
    monkeypatch.setattr(triton_backend, "COMBINE_MIN_TOKENS", table)
    monkeypatch.setitem(triton_backend._MAJORS, "cuda:7", 8)  # as if cuda:7 were an sm_80
    for dtype in (torch.bfloat16, torch.float16):
        assert triton_backend.choose_strategy(4095, 768, 3072, 2, dtype, device="cpu") == \
            "one_pass"
        assert triton_backend.choose_strategy(4096, 768, 3072, 2, dtype, device="cpu") == \
            "combine"
        # None: one pass at every count; more experts than listed: the last entry
        assert triton_backend.choose_strategy(10**7, 8, 8, 1, dtype, device="cpu") == "one_pass"
        assert triton_backend.choose_strategy(2048, 8, 8, 6, dtype, device="cpu") == "combine"
        assert triton_backend.choose_strategy(2047, 8, 8, 6, dtype, device="cpu") == "one_pass"
        assert triton_backend.choose_strategy(8192, 8, 8, 1, dtype, device="cuda:7") == "combine"
        assert triton_backend.choose_strategy(1023, 8, 8, 2, dtype, device="cuda:7") == \
            "one_pass"
    # Exact fp32 and fp64 take cuBLAS's exact GEMMs at every size; fp32 with TF32 the rule.
    monkeypatch.setattr(triton_backend, "_tf32_allowed", lambda: False)
    assert triton_backend.choose_strategy(1, 8, 8, 2, torch.float32) == "combine"
    assert triton_backend.choose_strategy(1, 8, 8, 2, torch.float64) == "combine"
    monkeypatch.setattr(triton_backend, "_tf32_allowed", lambda: True)
    assert triton_backend.choose_strategy(1, 8, 8, 2, torch.float32) == "one_pass"
    assert triton_backend.choose_strategy(1, 8, 8, 2, torch.float64) == "combine"
    for name in ("one_pass", "combine"):
        assert triton_backend.choose_strategy(1, 8, 8, 2, strategy=name) == name
        assert triton_backend.choose_strategy(10**6, 8, 8, 2, strategy=name) == name
    with pytest.raises(ValueError, match="strategy must be one of"):
        triton_backend.choose_strategy(1, 8, 8, 2, strategy="onepass")
    # mos_kernels.resolve_strategy says the same for the triton backend
    assert mos_kernels.resolve_strategy("auto", "triton", 4096, 768, 3072, 2,
                                        torch.bfloat16, "cpu") == "combine"
    assert mos_kernels.resolve_strategy("auto", "triton", 4095, 768, 3072, 2,
                                        torch.bfloat16, "cpu") == "one_pass"
    assert mos_kernels.resolve_strategy("auto", "triton", 1, 8, 8, 2, torch.float64,
                                        DEVICE) == "combine"
    assert mos_kernels.resolve_strategy("one_pass", "triton", 10**6, 8, 8, 2, torch.float64,
                                        DEVICE) == "one_pass"


def test_auto_runs_the_strategy_the_rule_picks(monkeypatch):
    """Below the threshold nothing materialises W_a; from it on the combine pass runs."""
    combined = []
    original = triton_backend._combine
    monkeypatch.setattr(triton_backend, "_combine",
                        lambda *a: combined.append(1) or original(*a))
    monkeypatch.setattr(triton_backend, "COMBINE_MIN_TOKENS", {8: (16,) * 8, 9: (16,) * 8})
    monkeypatch.setattr(triton_backend, "_tf32_allowed", lambda: True)  # fp32 follows the rule
    x, experts, beta, bias = (t.detach() for t in make_inputs(
        15, 20, 17, 24, 20, 2, False, "expert", torch.float32))
    y_small = triton_backend.forward(x, experts, beta, bias, "auto")
    assert not combined
    x2 = torch.cat([x, x])
    y_large = triton_backend.forward(x2, experts, beta, bias, "auto")
    assert combined
    assert_close(y_large[:15], y_small.double(), torch.float32, "output")
    assert mos_kernels.plan(x2, experts, beta, bias, backend="triton") == ("triton", "combine")
    assert mos_kernels.plan(x, experts, beta, bias, backend="triton") == ("triton", "one_pass")


def test_tf32_policy_follows_torch(monkeypatch):
    monkeypatch.setattr(triton_backend, "_tf32_allowed", lambda: False)
    assert triton_backend._precision(torch.float32) == "ieee"
    monkeypatch.setattr(triton_backend, "_tf32_allowed", lambda: True)
    assert triton_backend._precision(torch.float32) == "tf32"
    assert triton_backend._precision(torch.bfloat16) == "ieee"  # not used by half dots
    assert triton_backend._precision(torch.float64) == "ieee"


def test_unsupported_dtype_and_device_are_named():
    x, experts, beta = (torch.randn(4, 6), torch.randn(2, 5, 6), torch.rand(5, 2))
    fp8 = [t.to(DEVICE).to(torch.float8_e4m3fn) for t in (x, experts, beta)]
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        triton_backend.forward(*fp8, None, "auto")
    assert "CUDA" in triton_backend.unavailable_reason(torch.device("meta"))
    assert triton_backend.unavailable_reason(DEVICE) is None


def test_config_pruning():
    """Configs whose tiles overflow shared memory are dropped (at least one always stays);
    small problems take the first config that fits, untimed."""
    configs = triton_backend._GEMM_CONFIGS
    shared = triton_backend._gemm_shared
    budget = triton_backend._shared_memory_budget()
    for m in (1, 2, 6, 64):
        fits = [c for c in configs if shared(c.kwargs, c.num_stages, m) * 4 <= budget]
        kept = triton_backend._prune(configs, shared, 4, m, 8192 * 4096 * 1024)
        assert kept and all(c in configs for c in kept)
        assert kept == fits or (not fits and len(kept) == 1)
        assert triton_backend._prune(configs, shared, 4, m, 64 * 64 * 64) == kept[:1]
    assert len(triton_backend._prune(configs, shared, 4, 1, 8192 * 4096 * 1024)) > 1
    # Triton 3.6 asked for 335872 bytes for this config at m = 6 in fp32 on an H100
    seen = dict(BLOCK_T=32, BLOCK_N=64, BLOCK_K=64, GROUP=8)
    assert triton_backend._gemm_shared(seen, 4, 6) * 4 >= 335872
