"""Every fused backend against the float64 reference: output and every gradient."""
import itertools

import pytest
import torch

import mos_kernels
from oracle import DEVICE, FUSED, assert_close, make_inputs, reference64, run

# (tokens, n_in, n_out, K_max, N_max): odd sizes, round sizes, slices smaller than the experts.
SHAPES = [
    (1, 1, 1, 1, 1),
    (7, 7, 7, 7, 7),
    (33, 7, 33, 40, 127),
    (127, 127, 33, 127, 33),
    (7, 33, 127, 128, 130),
    (64, 64, 64, 64, 64),
    (128, 96, 256, 128, 256),
]
CONFIGS = list(itertools.product([1, 2, 3, 6], ["neuron", "layer"], ["none", "shared", "expert"]))
DTYPES = {"cpu": [torch.float32, torch.float64], "cuda": [torch.float32, torch.float16,
                                                         torch.bfloat16]}[DEVICE.type]


def cases(backend):
    """The full product for the fast backends; for triton, every shape and every (m, granularity,
    bias) configuration, each at least once: on CPU it is interpreted, and on a GPU each new
    combination compiles new kernels (about a second each on an H100)."""
    if backend == "triton":
        return [(shape, CONFIGS[(i * 7) % len(CONFIGS)]) for i, shape in enumerate(SHAPES)] + \
               [(SHAPES[2], config) for config in CONFIGS]
    return list(itertools.product(SHAPES, CONFIGS))


PARAMS = [pytest.param(b, s, c, id=f"{b}-{'x'.join(map(str, s))}-m{c[0]}-{c[1]}-{c[2]}")
          for b in FUSED for s, c in cases(b)]


def check_backend(backend, shape, config, dtype, lead=(), transform=None, **options):
    tokens, n_in, n_out, k_max, n_max = shape
    m, granularity, bias_kind = config
    tensors = make_inputs(tokens, n_in, n_out, k_max, n_max, m, granularity == "layer", bias_kind,
                          dtype, lead=lead)
    if transform is not None:
        tensors[0] = transform(tensors[0])

    def fused(x, experts, beta, bias, out_features):
        return mos_kernels.mos_linear(x, experts, beta, bias, out_features=out_features,
                                      backend=backend, **options)

    y, grads, dy = run(fused, tensors, n_out)
    y_ref, grads_ref = reference64(tensors, n_out, dy)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close(y, y_ref, dtype, "output")
    for name, g, g_ref in zip(["dx", "dexperts", "dbeta", "dbias"], grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert_close(g, g_ref, dtype, name)
    d_experts = grads[1]
    assert not d_experts[:, n_out:].any() and not d_experts[:, :, n_in:].any(), \
        "dexperts must be exactly zero outside the active slice"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, shape, config", PARAMS)
def test_matches_float64_reference(backend, shape, config, dtype):
    check_backend(backend, shape, config, dtype)


# save_mixed_weight: mos_combine, F.linear, mos_combine_backward. Every shape and every
# configuration at least once per backend.
SAVED_CASES = [(SHAPES[i % len(SHAPES)], CONFIGS[i * 5 % len(CONFIGS)])
               for i in range(len(CONFIGS))]
SAVED_PARAMS = [pytest.param(b, s, c, id=f"{b}-{'x'.join(map(str, s))}-m{c[0]}-{c[1]}-{c[2]}")
                for b in FUSED for s, c in SAVED_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, shape, config", SAVED_PARAMS)
def test_save_mixed_weight_matches_float64_reference(backend, shape, config, dtype):
    check_backend(backend, shape, config, dtype, save_mixed_weight=True)


@pytest.mark.skipif("cpu" not in FUSED, reason="the C++ extension is not built")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", [(2, "neuron", "expert"), (3, "layer", "shared"),
                                    (6, "neuron", "none")], ids=str)
def test_cpu_bfloat16(shape, config):
    check_backend("cpu", shape, config, torch.bfloat16)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("granularity", ["neuron", "layer"])
def test_leading_dims_and_noncontiguous_x(backend, granularity):
    config = (3, granularity, "expert")
    check_backend(backend, (5, 33, 20, 40, 24), config, torch.float32, lead=(2, 3))
    # x as a transposed view: (tokens, n_in) with strides (1, tokens)
    check_backend(backend, (33, 20, 17, 24, 20), config, torch.float32,
                  transform=lambda x: x.detach().t().contiguous().t().requires_grad_(True))
    # x as a column slice of a wider tensor
    check_backend(backend, (9, 16, 17, 24, 20), config, torch.float32,
                  transform=lambda x: torch.cat([x, x], 1).detach()[:, ::2].requires_grad_(True))


@pytest.mark.parametrize("save", [False, True], ids=["", "saved"])
@pytest.mark.parametrize("backend", FUSED)
def test_gradients_are_deterministic(backend, save):
    tensors = make_inputs(130, 70, 50, 80, 60, 3, False, "expert", torch.float32)
    fused = lambda *a, out_features: mos_kernels.mos_linear(*a, out_features=out_features,
                                                            backend=backend,
                                                            save_mixed_weight=save)
    _, first, dy = run(fused, tensors, 50)
    _, second, _ = run(fused, tensors, 50, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# Each subset takes its own path through the backward: dx alone (W_a combined on its own), dx
# with only a bias gradient (no G), and the weight side with and without dx.
@pytest.mark.parametrize("wanted", ["experts,bias", "x", "x,bias", "x,beta"])
@pytest.mark.parametrize("save", [False, True], ids=["", "saved"])
@pytest.mark.parametrize("backend", FUSED)
def test_only_requested_gradients(backend, save, wanted):
    tensors = dict(zip(("x", "experts", "beta", "bias"),
                       make_inputs(9, 12, 10, 16, 12, 2, False, "expert", torch.float32)))
    wanted = wanted.split(",")
    for name, t in tensors.items():
        t.requires_grad_(name in wanted)
    y = mos_kernels.mos_linear(*tensors.values(), backend=backend, save_mixed_weight=save)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert all((t.grad is not None) == (name in wanted) for name, t in tensors.items())
    for t in tensors.values():
        t.requires_grad_(True)
    y_ref = mos_kernels.reference.mos_linear(*tensors.values())
    expected = torch.autograd.grad(y_ref, [tensors[name] for name in wanted], dy)
    for name, grad in zip(wanted, expected):
        torch.testing.assert_close(tensors[name].grad, grad)


@pytest.mark.parametrize("backend", [b for b in FUSED if b == "cpu"])
@pytest.mark.parametrize("granularity", ["neuron", "layer"])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "expert"])
def test_gradcheck(backend, granularity, bias_kind):
    tensors = make_inputs(3, 4, 3, 5, 4, 2, granularity == "layer", bias_kind, torch.float64)
    fn = lambda *a: mos_kernels.mos_linear(*a[:3], a[3] if len(a) > 3 else None, out_features=3,
                                           backend=backend)
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layerwise, bias_kind", [(False, "expert"), (True, "shared"),
                                                  (False, "none")])
def test_opcheck(backend, layerwise, bias_kind):
    x, experts, beta, *bias = make_inputs(6, 10, 7, 12, 9, 2, layerwise, bias_kind, torch.float32)
    beta_rows = beta.expand(7, 2)
    args = (x, experts, beta_rows, bias[0] if bias else None, backend)
    torch.library.opcheck(torch.ops.mos_kernels.mos_linear.default, args)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layerwise, bias_kind", [(False, "expert"), (True, "expert"),
                                                  (False, "none")])
def test_opcheck_combine(backend, layerwise, bias_kind):
    _, experts, beta, *bias = make_inputs(6, 10, 7, 12, 9, 2, layerwise, bias_kind, torch.float32)
    beta_rows = beta.expand(7, 2)
    bias = bias[0] if bias else None
    torch.library.opcheck(torch.ops.mos_kernels.mos_combine.default,
                          (experts, beta_rows, bias, 10, backend))
    d_weight = torch.randn(7, 10, device=DEVICE)
    d_mixed_bias = torch.randn(7, device=DEVICE) if bias is not None else None
    needs = [True, True, bias is not None]
    torch.library.opcheck(torch.ops.mos_kernels.mos_combine_backward.default,
                          (d_weight, d_mixed_bias, experts.detach(), beta_rows.detach(),
                           None if bias is None else bias.detach(), backend, needs))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layerwise", [False, True])
def test_custom_op_and_eager_path_agree(backend, layerwise):
    """Eager calls skip the custom op's dispatch; the op itself (what torch.compile runs) must
    give the same output and gradients."""
    tensors = make_inputs(9, 20, 13, 24, 16, 3, layerwise, "expert", torch.float32)
    x, experts, beta, bias = tensors
    beta_rows = beta.expand(13, 3)
    y_op = torch.ops.mos_kernels.mos_linear(x, experts, beta_rows, bias, backend)
    dy = torch.randn_like(y_op)
    grads_op = torch.autograd.grad(y_op, tensors, dy)
    y = mos_kernels.mos_linear(x, experts, beta, bias, out_features=13, backend=backend)
    grads = torch.autograd.grad(y, tensors, dy)
    torch.testing.assert_close(y_op, y, rtol=0, atol=0)
    for a, b in zip(grads_op, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # save_mixed_weight: mos_combine and its eager twin
    weight, mixed_bias = torch.ops.mos_kernels.mos_combine(experts, beta_rows, bias, 20, backend)
    y_op = torch.nn.functional.linear(x, weight, mixed_bias)
    grads_op = torch.autograd.grad(y_op, tensors, dy)
    y = mos_kernels.mos_linear(x, experts, beta, bias, out_features=13, backend=backend,
                               save_mixed_weight=True)
    grads = torch.autograd.grad(y, tensors, dy)
    torch.testing.assert_close(y_op, y, rtol=0, atol=0)
    for a, b in zip(grads_op, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# What torch.autocast runs in on this device (bf16 needs sm_80 on a GPU).
AUTOCAST_DTYPE = torch.bfloat16
if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 8:
    AUTOCAST_DTYPE = torch.float16


@pytest.mark.parametrize("save", [False, True], ids=["", "saved"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("backend", FUSED)
def test_compiled_module_has_no_graph_break(backend, autocast, save):
    torch._dynamo.reset()
    mos_kernels.ops._resolved.clear()  # the backend is first resolved inside the compiled call
    layer = mos_kernels.MoSLinear(24, 16, num_experts=3, backend=backend,
                                  save_mixed_weight=save).to(DEVICE)
    layer.set_arch(torch.rand(10), in_features=20, out_features=13)
    x = torch.randn(4, 5, 20, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True)

    def context():
        return torch.autocast(DEVICE.type, dtype=AUTOCAST_DTYPE, enabled=autocast)

    with context():
        y = compiled(x)
    y.float().square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    with context():
        y_eager = layer(x)
    y_eager.float().square().sum().backward()
    assert y.dtype == (AUTOCAST_DTYPE if autocast else torch.float32)
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", FUSED)
def test_compiled_with_cuda_graphs(backend):
    # mode="reduce-overhead" replays the captured kernels: no host work per call, which is what
    # small layers on a GPU need. The op must allocate and launch only on the current stream.
    torch._dynamo.reset()
    layer = mos_kernels.MoSLinear(64, 48, num_experts=2, backend=backend).to(DEVICE)
    layer.set_arch(torch.rand(10), in_features=40, out_features=33)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up runs, then captured replays
        x = torch.randn(8, 40, device=DEVICE)
        y = compiled(x).clone()
        torch.testing.assert_close(y, layer(x), msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_autocast_computes_in_the_autocast_dtype(backend):
    """fp32 inputs under torch.autocast: the op runs in the autocast dtype (as F.linear does) and
    the gradients come back in fp32, matching the float64 reference of the rounded inputs."""
    dtype = AUTOCAST_DTYPE
    tensors = make_inputs(33, 20, 13, 24, 16, 3, False, "expert", torch.float32)
    dy = torch.randn(33, 13, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = mos_kernels.mos_linear(*tensors, out_features=13, backend=backend)
    grads = torch.autograd.grad(y, tensors, dy)
    assert y.dtype == dtype and all(g.dtype == torch.float32 for g in grads)
    rounded = [t.detach().to(dtype) for t in tensors]
    y_ref, grads_ref = reference64(rounded, 13, dy)
    assert_close(y, y_ref, dtype, "output")
    for name, g, g_ref in zip(["dx", "dexperts", "dbeta", "dbias"], grads, grads_ref):
        assert_close(g, g_ref, dtype, name)


def test_backend_choice():
    assert mos_kernels.available_backends("cpu")[0] == "reference"
    assert mos_kernels.resolve_backend("reference") == "reference"
    assert mos_kernels.resolve_backend("auto", "cpu") in ("cpu", "reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        mos_kernels.resolve_backend("fastest")
    if "cpu" in mos_kernels.available_backends("cpu"):
        assert mos_kernels.resolve_backend("auto", "cpu") == "cpu"
        with pytest.raises(RuntimeError, match="'cpu' cannot run here: it runs on CPU"):
            mos_kernels.resolve_backend("cpu", "meta")
    with pytest.raises(RuntimeError, match="'cuda' cannot run here"):
        mos_kernels.resolve_backend("cuda", "cpu")
    # On GPUs the CUDA C++ backend first (faster in every row of the H100 benchmark), Triton next.
    assert mos_kernels.ops._auto_order(torch.device("cuda")) == ("cuda", "triton")
    if not torch.cuda.is_available():  # asking about a device this torch cannot use
        assert mos_kernels.available_backends("cuda") == ["reference"]
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            mos_kernels.resolve_backend("triton", "cuda")


def test_meta_tensors_give_shapes():
    # Shape inference on the meta device (no data, no autocast there) runs the reference form.
    x = torch.empty(3, 7, 20, device="meta")
    experts = torch.empty(2, 16, 24, device="meta")
    y = mos_kernels.mos_linear(x, experts, torch.empty(13, 2, device="meta"))
    assert y.shape == (3, 7, 13) and y.device.type == "meta"


def test_reference_backend_matches_reference_function():
    x, experts, beta, bias = make_inputs(5, 6, 4, 8, 5, 2, False, "expert", torch.float64,
                                         device="cpu")
    y = mos_kernels.mos_linear(x, experts, beta, bias, backend="reference")
    torch.testing.assert_close(y, mos_kernels.reference.mos_linear(x, experts, beta, bias))


def _valid(**changes):
    args = dict(x=torch.randn(3, 4), experts=torch.randn(2, 6, 5), beta=torch.rand(6, 2),
                bias=None, out_features=None)
    args.update(changes)
    return args


@pytest.mark.parametrize("fn", [mos_kernels.mos_linear, mos_kernels.reference.mos_linear])
@pytest.mark.parametrize("changes, error, words", [
    (dict(experts=torch.randn(6, 5)), ValueError, "experts must have shape"),
    (dict(x=torch.randn(3, 7)), ValueError, "n_in = 7"),
    (dict(beta=torch.rand(7, 2)), ValueError, "n_out = 7"),
    (dict(beta=torch.rand(6, 3)), ValueError, "beta has shape"),
    (dict(beta=torch.rand(3)), ValueError, "beta has shape"),
    (dict(beta=torch.rand(2)), ValueError, "needs out_features"),
    (dict(beta=torch.rand(2, 2, 2)), ValueError, "beta must have shape"),
    (dict(out_features=5), ValueError, "out_features = 5"),
    (dict(bias=torch.randn(5)), ValueError, "bias has shape"),
    (dict(bias=torch.randn(3, 6)), ValueError, "bias has shape"),
    (dict(x=torch.randn(3, 4, dtype=torch.float64)), TypeError, "dtype"),
    (dict(x=torch.ones(3, 4, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (dict(beta=[[0.5, 0.5]] * 6), TypeError, "beta must be a torch.Tensor"),
    (dict(bias=torch.randn(6, device="meta")), ValueError, "bias is on meta"),
])
def test_bad_input_is_named(fn, changes, error, words):
    args = _valid(**changes)
    with pytest.raises(error, match=words):
        fn(args.pop("x"), args.pop("experts"), args.pop("beta"), args.pop("bias"), **args)


def test_bad_input_layerwise_out_features_too_large():
    with pytest.raises(ValueError, match="n_out = 9"):
        mos_kernels.mos_linear(torch.randn(3, 4), torch.randn(2, 6, 5), torch.rand(2),
                               out_features=9)


def test_public_names_and_constants():
    assert mos_kernels.BACKENDS == ("auto", "reference", "cpu", "triton", "cuda")
    assert mos_kernels.STRATEGIES == ("auto", "one_pass", "combine")
    assert mos_kernels.backend_strategies("reference") == ("auto",)
    assert mos_kernels.backend_strategies("cpu", "cpu") == ("auto", "combine")
    for name in ("triton", "cuda"):
        if name in FUSED:
            assert mos_kernels.backend_strategies(name, DEVICE) == mos_kernels.STRATEGIES


def test_strategy_argument_is_checked():
    x, experts, beta = torch.randn(3, 4), torch.randn(2, 6, 5), torch.rand(6, 2)
    with pytest.raises(ValueError, match=r"strategy must be one of \('auto', 'one_pass', "
                                         r"'combine'\), got 'fused'"):
        mos_kernels.mos_linear(x, experts, beta, strategy="fused")
    with pytest.raises(ValueError, match=r"strategy 'combine' is not available on the "
                                         r"'reference' backend; there strategy must be one of "
                                         r"\('auto',\)"):
        mos_kernels.mos_linear(x, experts, beta, backend="reference", strategy="combine")
    if "cpu" in FUSED:
        with pytest.raises(ValueError, match=r"strategy 'one_pass' is not available on the "
                                             r"'cpu' backend; there strategy must be one of "
                                             r"\('auto', 'combine'\)"):
            mos_kernels.mos_linear(x, experts, beta, backend="cpu", strategy="one_pass")
        with pytest.raises(ValueError, match="not available on the 'cpu' backend"):
            mos_kernels.MoSLinear(4, 6, strategy="one_pass")(x)
        with pytest.raises(ValueError, match="mos_linear \\(cpu\\): strategy must be 'auto' or "
                                             "'combine', got 'one_pass'"):
            torch.ops.mos_kernels_ext.forward(x, experts, beta, None, "one_pass")


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_plan_says_what_runs(backend):
    x, experts, beta, bias = make_inputs(5, 6, 4, 8, 5, 2, False, "expert", torch.float32)
    name, strategy = mos_kernels.plan(x, experts, beta, bias, backend=backend)
    assert name == backend
    assert strategy == mos_kernels.resolve_strategy("auto", backend, 5, 4, 6, 2, torch.float32,
                                                    DEVICE)
    assert strategy in ("one_pass", "combine")
    if backend in ("reference", "cpu", "cuda"):  # the rule: combine unless one_pass is asked
        assert strategy == "combine"
    for asked in mos_kernels.backend_strategies(backend, DEVICE)[1:]:
        assert mos_kernels.plan(x, experts, beta, bias, backend=backend,
                                strategy=asked) == (backend, asked)
    assert mos_kernels.plan(x, experts, beta, bias, backend=backend,
                            save_mixed_weight=True) == (backend, "combine")
    assert mos_kernels.plan(x, experts, beta, bias)[0] == mos_kernels.resolve_backend("auto",
                                                                                      DEVICE)


@pytest.mark.parametrize("backend", FUSED)
def test_eager_calls_take_one_autograd_node(backend):
    """cpu and cuda: the extension's C++ node, whose backward runs in C++, straight onto the
    leaves (leading dimensions and layer-wise beta handled inside it); triton: a Python
    Function."""
    for layerwise in (False, True):
        x, experts, beta, bias = make_inputs(5, 6, 4, 8, 5, 2, layerwise, "expert",
                                             torch.float32, lead=(2,))
        y = mos_kernels.mos_linear(x, experts, beta, bias, out_features=4, backend=backend)
        if backend == "triton":  # the reshape of leading dimensions is a node of its own
            assert "_EagerMoSLinear" in y.grad_fn.next_functions[0][0].name()
            continue
        assert "LinearNode" in y.grad_fn.name()
        assert [f[0].name() for f in y.grad_fn.next_functions] == \
            ["torch::autograd::AccumulateGrad"] * 4
