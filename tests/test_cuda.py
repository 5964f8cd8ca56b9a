"""CUDA-only checks of the "cuda" backend beyond tests/test_ops.py (which already runs it against
the float64 reference on every shape and configuration when a GPU is present): both strategies
of the binding (the strategy argument), strided and misaligned inputs, empty token sets, float64
gradcheck, errors."""
import itertools

import pytest
import torch

import mos_kernels
from oracle import assert_close, make_inputs, reference64, run
from test_ops import CONFIGS, SHAPES, check_backend

GPU_REASON = None
if not torch.cuda.is_available():
    GPU_REASON = "needs a CUDA GPU"
elif "cuda" not in mos_kernels.available_backends("cuda"):
    GPU_REASON = ("needs the cuda backend: " +
                  str(mos_kernels.backends.load("cuda").unavailable_reason(torch.device("cuda"))))
pytestmark = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STRATEGIES = ["one_pass", "combine"]


@pytest.fixture(autouse=True)
def _bf16_needs_sm80(request):
    dtype = request.node.callspec.params.get("dtype") if hasattr(request.node, "callspec") else None
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bfloat16 needs sm_80 or newer")


# tests/test_ops.py runs the default strategy (combine) on every shape and configuration; the
# same for the one-pass kernels:
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, config", list(itertools.product(SHAPES, CONFIGS)))
def test_one_pass_strategy_matches_reference(shape, config, dtype):
    check_backend("cuda", shape, config, dtype, strategy="one_pass")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(300, 256, 384, 264, 392), (1000, 40, 136, 48, 200),
                                   (129, 129, 129, 129, 129), (64, 1100, 72, 1104, 80)])
def test_several_tiles_every_way(strategy, dtype, shape):
    # More than one tile along tokens, n_in and n_out, with 16-byte loads and with ragged edges;
    # n_in = 1100 lets whole elementwise units (csrc/cuda/mos_linear_elementwise.cuh) take their
    # 16-byte path, which needs rows of at least 776 half-precision columns.
    check_backend("cuda", shape, (6, "neuron", "expert"), dtype, strategy=strategy)
    check_backend("cuda", shape, (2, "layer", "shared"), dtype, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_and_misaligned_inputs(strategy, dtype):
    tokens, n_in, n_out, k_max, n_max, m = 70, 40, 33, 48, 40, 3
    x, experts, beta, bias = make_inputs(tokens, n_in, n_out, k_max, n_max, m, False, "expert",
                                         dtype)
    variants = {
        # experts with k not the last-stride dimension: element-wise loads
        "experts_k_strided": lambda: (x, experts.detach().transpose(1, 2).contiguous()
                                      .transpose(1, 2).requires_grad_(True), beta, bias),
        # every tensor a view at an odd offset: no 16-byte alignment
        "misaligned": lambda: tuple(
            torch.cat([t.detach().reshape(-1)[:1], t.detach().reshape(-1)])[1:]
            .view(t.shape).requires_grad_(True) for t in (x, experts, beta, bias)),
        # beta transposed (column-major), bias rows strided
        "beta_bias_strided": lambda: (x, experts, beta.detach().t().contiguous().t()
                                      .requires_grad_(True),
                                      torch.stack([bias.detach()] * 2, 2)[..., 0]
                                      .requires_grad_(True)),
    }
    for name, make in variants.items():
        tensors = list(make())
        fused = lambda *a, out_features: mos_kernels.mos_linear(*a, out_features=out_features,
                                                                backend="cuda",
                                                                strategy=strategy)
        y, grads, dy = run(fused, tensors, n_out)
        y_ref, grads_ref = reference64(tensors, n_out, dy)
        assert_close(y, y_ref, dtype, f"{name} output")
        for g_name, g, g_ref in zip(["dx", "dexperts", "dbeta", "dbias"], grads, grads_ref):
            assert g.is_contiguous(), f"{name} {g_name}"
            assert_close(g, g_ref, dtype, f"{name} {g_name}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bias_kind", ["none", "shared", "expert"])
def test_no_tokens(strategy, bias_kind):
    x, experts, beta, *bias = make_inputs(5, 6, 4, 8, 5, 2, False, bias_kind, torch.float32)
    x = x.detach()[:0].requires_grad_(True)
    bias = bias[0] if bias else None
    y = mos_kernels.mos_linear(x, experts, beta, bias, backend="cuda", strategy=strategy)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 6)
    assert not experts.grad.any() and not beta.grad.any()
    if bias is not None:
        assert not bias.grad.any()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("granularity, bias_kind", [("neuron", "expert"), ("layer", "shared"),
                                                    ("neuron", "none")])
def test_gradcheck_float64(strategy, granularity, bias_kind):
    tensors = make_inputs(5, 6, 4, 7, 5, 3, granularity == "layer", bias_kind, torch.float64)
    fn = lambda *a: mos_kernels.mos_linear(*a[:3], a[3] if len(a) > 3 else None, out_features=4,
                                           backend="cuda", strategy=strategy)
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_weight_gradients_are_bit_identical(strategy, dtype):
    tensors = make_inputs(2000, 300, 200, 320, 256, 6, False, "expert", dtype)
    fused = lambda *a, out_features: mos_kernels.mos_linear(*a, out_features=out_features,
                                                            backend="cuda", strategy=strategy)
    _, first, dy = run(fused, tensors, 200)
    for _ in range(3):
        _, again, _ = run(fused, tensors, 200, dy)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_some_gradients(strategy):
    # Each subset of (dx, dexperts, dbeta, dbias) on its own, straight through the extension op.
    x, experts, beta, bias = [t.detach() for t in make_inputs(40, 24, 20, 32, 24, 3, False,
                                                              "expert", torch.float32)]
    dy = torch.randn(40, 20, device=x.device)
    op = torch.ops.mos_kernels_ext.backward
    full = op(dy, x, experts, beta, bias, [True] * 4, strategy)
    for needs in itertools.product([False, True], repeat=4):
        grads = op(dy, x, experts, beta, bias, list(needs), strategy)
        for need, g, g_full in zip(needs, grads, full):
            if need:
                torch.testing.assert_close(g, g_full)
            else:
                assert g is None


def test_bad_input_raises_clear_errors():
    x, experts, beta, bias = [t.detach() for t in make_inputs(4, 6, 5, 8, 7, 2, False, "expert",
                                                              torch.float32)]
    op = torch.ops.mos_kernels_ext
    with pytest.raises(RuntimeError, match=r"mos_linear \(cuda\): beta must have m = 2"):
        op.forward(x, experts, beta[:, :1], bias)
    with pytest.raises(RuntimeError, match=r"mos_linear \(cuda\): active slice"):
        op.forward(torch.randn(4, 9, device=x.device), experts, beta, bias)
    with pytest.raises(RuntimeError, match=r"mos_linear \(cuda\): bias must be"):
        op.forward(x, experts, beta, bias[:, :3])
    with pytest.raises(RuntimeError, match=r"share one dtype"):
        op.forward(x.double(), experts, beta, bias)
    with pytest.raises(RuntimeError, match=r"one device"):
        op.forward(x, experts.cpu(), beta, bias)
    with pytest.raises(RuntimeError, match=r"dy must be \(4, 5\)"):
        op.backward(torch.randn(4, 6, device=x.device), x, experts, beta, bias, [True] * 4)
    with pytest.raises(RuntimeError, match=r"not supported"):
        op.forward(x.int(), experts.int(), beta.int(), None)


def test_unknown_strategy_is_named():
    x, experts, beta = [t.detach() for t in make_inputs(4, 6, 5, 8, 7, 2, False, "none",
                                                        torch.float32)]
    with pytest.raises(ValueError, match="strategy must be 'auto', 'one_pass' or 'combine'"):
        torch.ops.mos_kernels_ext.forward(x, experts, beta, None, "fused")
    with pytest.raises(ValueError, match="strategy must be one of"):
        mos_kernels.mos_linear(x, experts, beta, backend="cuda", strategy="gemm")
