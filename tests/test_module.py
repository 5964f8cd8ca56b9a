"""MoSLinear: the router, architecture switching, collapse to nn.Linear, state, the eval cache,
the one-node path (router and op in one C++ autograd node)."""
import copy

import pytest
import torch
from torch import nn

import mos_kernels
from mos_kernels import MoSLinear
from oracle import assert_close


def make(granularity="neuron", bias=True, **kw):
    torch.manual_seed(0)
    return MoSLinear(24, 16, bias=bias, num_experts=3, granularity=granularity, arch_dim=4, **kw)


@pytest.mark.parametrize("granularity", ["neuron", "layer"])
def test_router_rows_sum_to_one(granularity):
    layer = make(granularity).set_arch(torch.rand(4), out_features=11)
    beta = layer.router_scores()
    assert beta.shape == ((11, 3) if granularity == "neuron" else (3,))
    torch.testing.assert_close(beta.sum(-1), torch.ones(beta.shape[:-1]))
    assert (beta > 0).all()


def test_drop_in_for_linear_runs_full_size():
    layer = MoSLinear(24, 16)
    assert layer.experts.shape == (2, 16, 24) and layer.bias.shape == (2, 16)
    assert (layer.active_in, layer.active_out) == (24, 16)
    assert layer(torch.randn(2, 5, 24)).shape == (2, 5, 16)
    torch.testing.assert_close(layer.arch, torch.ones(10))


@pytest.mark.parametrize("granularity", ["neuron", "layer"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_and_switches_architecture(granularity, bias):
    layer = make(granularity, bias)
    x = torch.randn(5, 24)
    outputs = []
    for encoding, n_in, n_out in [(torch.ones(4), 24, 16), (torch.rand(4), 13, 7),
                                  (torch.rand(4), 24, 9)]:
        layer.set_arch(encoding, in_features=n_in, out_features=n_out)
        y = layer(x[:, :n_in])
        beta = layer.router_scores()
        expected = mos_kernels.reference.mos_linear(x[:, :n_in], layer.experts, beta, layer.bias,
                                                    out_features=n_out)
        torch.testing.assert_close(y, expected)
        outputs.append(y)
    assert [o.shape[-1] for o in outputs] == [16, 7, 9]


def test_router_receives_gradient():
    layer = make().set_arch(torch.rand(4), 20, 10)
    layer(torch.randn(6, 20)).square().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not layer.experts.grad[:, 10:].any() and not layer.experts.grad[:, :, 20:].any()


@pytest.mark.parametrize("granularity", ["neuron", "layer"])
def test_save_mixed_weight_trains_alike(granularity):
    plain = make(granularity).set_arch(torch.rand(4), 20, 10)
    saving = make(granularity, save_mixed_weight=True)
    saving.load_state_dict(plain.state_dict())
    saving.set_arch(plain.arch, 20, 10)
    x = torch.randn(6, 20)
    y_plain, y_saving = plain(x), saving(x)
    # The saving layer's graph is F.linear on W_a (which keeps W_a), not the fused op.
    saved_node, fused_node = type(y_saving.grad_fn).__name__, type(y_plain.grad_fn).__name__
    assert ("Addmm" in saved_node or "Linear" in saved_node) and saved_node != fused_node
    y_plain.square().sum().backward()
    y_saving.square().sum().backward()
    torch.testing.assert_close(y_saving, y_plain)
    for (name, p), q in zip(plain.named_parameters(), saving.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")
    assert "save_mixed_weight=True" in repr(saving)


@pytest.mark.parametrize("granularity", ["neuron", "layer"])
@pytest.mark.parametrize("bias", [True, False])
def test_to_linear_gives_the_same_output(granularity, bias):
    layer = make(granularity, bias).set_arch(torch.rand(4), in_features=17, out_features=5)
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear) and type(linear) is nn.Linear
    assert linear.weight.shape == (5, 17) and (linear.bias is not None) == bias
    assert linear.weight.is_leaf and linear.weight.requires_grad
    x = torch.randn(3, 17)
    torch.testing.assert_close(linear(x), layer(x))


def test_state_dict_round_trip():
    layer = make().set_arch(torch.rand(4), 20, 10)
    state = layer.state_dict()
    assert set(state) == {"experts", "bias", "router.0.weight", "router.0.bias", "router.2.weight",
                          "router.2.bias"}
    torch.manual_seed(1)
    other = MoSLinear(24, 16, num_experts=3, arch_dim=4)
    other.load_state_dict(state)
    other.set_arch(layer.arch.clone(), 20, 10)
    x = torch.randn(4, 20)
    torch.testing.assert_close(other(x), layer(x))


def test_eval_cache_computes_once_and_invalidates(monkeypatch):
    layer = make().set_arch(torch.rand(4), 20, 10).eval()
    calls = []
    original = MoSLinear.collapsed_weights
    monkeypatch.setattr(MoSLinear, "collapsed_weights",
                        lambda self: calls.append(1) or original(self))
    x = torch.randn(4, 20)
    with torch.no_grad():
        first = layer(x)
        for _ in range(3):
            torch.testing.assert_close(layer(x), first)
        assert len(calls) == 1

        layer.set_arch(torch.rand(4), 20, 10)          # new architecture
        layer(x)
        assert len(calls) == 2
        layer.set_arch(layer.arch.clone(), 20, 8)      # same encoding, other slice
        layer(x)
        assert len(calls) == 3
        layer.experts.add_(1.0)                        # a parameter changes in place
        changed = layer(x)
        assert len(calls) == 4
        layer.router[2].bias.zero_()                   # the router changes
        layer(x)
        assert len(calls) == 5
        layer.load_state_dict(make().state_dict())     # new weights loaded
        layer(x)
        assert len(calls) == 6
    expected = mos_kernels.reference.mos_linear(x, layer.experts, layer.router_scores(),
                                                layer.bias, out_features=8)
    torch.testing.assert_close(layer(x), expected)
    assert len(calls) == 6  # gradients on: no cache
    del changed


def test_training_mode_never_uses_the_cache():
    layer = make().set_arch(torch.rand(4), 20, 10)
    with torch.no_grad():
        layer(torch.randn(2, 20))
    assert layer._cache is None


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="granularity"):
        MoSLinear(4, 4, granularity="expert")
    with pytest.raises(ValueError, match="num_experts"):
        MoSLinear(4, 4, num_experts=0)
    layer = make()
    with pytest.raises(ValueError, match=r"encoding must have shape \(4,\)"):
        layer.set_arch(torch.rand(5))
    with pytest.raises(ValueError, match="in_features must be in"):
        layer.set_arch(torch.rand(4), in_features=25)
    with pytest.raises(ValueError, match="out_features must be in"):
        layer.set_arch(torch.rand(4), out_features=0)
    layer.set_arch(torch.rand(4), in_features=20)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 20\)"):
        layer(torch.randn(3, 24))


ONE_NODE = "cpu" in mos_kernels.available_backends("cpu")


def plain_path(layer, x):
    """The layer's output by the module's router and the reference op, in float64."""
    beta = layer.router_scores()
    return mos_kernels.reference.mos_linear(x, layer.experts, beta, layer.bias,
                                            out_features=layer.active_out)


@pytest.mark.skipif(not ONE_NODE, reason="the C++ extension is not built")
@pytest.mark.parametrize("granularity", ["neuron", "layer"])
@pytest.mark.parametrize("bias, router_bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("n_in, n_out, lead", [(24, 16, ()), (13, 7, (2, 3)), (24, 9, (1,))])
def test_router_and_op_in_one_node_match_float64(granularity, bias, router_bias, n_in, n_out,
                                                 lead):
    """On the cpu backend the router and the op are one autograd node (backward in C++, the
    router in plain loops): output and every parameter's gradient against the module's own
    router and the reference op in float64, at the float32 tolerance."""
    layer = make(granularity, bias)
    if not router_bias:
        layer.router[0].bias = layer.router[2].bias = None
    layer.set_arch(torch.rand(4), in_features=n_in, out_features=n_out)
    x = torch.randn(*lead, 5, n_in, requires_grad=True)
    y = layer(x)
    assert "RoutedNode" in y.grad_fn.name()
    dy = torch.randn(y.shape)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    layer64 = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_(True)
    y64 = plain_path(layer64, x64)
    grads64 = torch.autograd.grad(y64, [x64, *layer64.parameters()], dy.double())
    names = ["output", "x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, (y,) + grads, (y64,) + grads64):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert_close(a, b, torch.float32, name)


@pytest.mark.skipif(not ONE_NODE, reason="the C++ extension is not built")
def test_one_node_gradients_are_bit_reproducible():
    layer = make().set_arch(torch.rand(4), 20, 10)
    x = torch.randn(6, 20)
    first = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()))
    second = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not ONE_NODE, reason="the C++ extension is not built")
def test_router_hooks_and_other_routers_take_the_plain_path():
    layer = make().set_arch(torch.rand(4), 20, 10)
    x = torch.randn(3, 20)
    assert "RoutedNode" in layer(x).grad_fn.name()
    seen = []
    handle = layer.router[0].register_forward_hook(lambda *a: seen.append(1))
    y = layer(x)
    assert seen and "RoutedNode" not in y.grad_fn.name()  # the hook ran: the module path
    handle.remove()
    assert "RoutedNode" in layer(x).grad_fn.name()
    layer.router = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 16 * 3))
    y = layer(x)
    assert "RoutedNode" not in y.grad_fn.name()
    torch.testing.assert_close(y, plain_path(layer, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the module path too
        assert layer(x).dtype == torch.bfloat16


def test_strategy_is_a_plain_attribute():
    layer = make(strategy="combine")
    assert layer.strategy == "combine" and "strategy='combine'" in repr(layer)
    layer.strategy = "auto"
    assert "strategy" not in repr(layer)
    layer.backend, layer.strategy = "reference", "combine"
    with pytest.raises(ValueError, match="strategy 'combine' is not available on the "
                                         "'reference' backend"):
        layer(torch.randn(2, 24))
