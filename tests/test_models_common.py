"""Tests of mos_models.common: elastic layers, checkpoints, evolution, training helpers, DDP."""
import io
import json
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mos_kernels
from mos_kernels import reference
from mos_models.common import (CheckpointError, ElasticEmbedding, ElasticLayerNorm, ElasticLinear,
                               EvolutionConfig, GeneSpace, MixedPrecision, Task, TrainConfig,
                               arch_rng, evolutionary_search, fused_adam_options,
                               latest_checkpoint, load_checkpoint, load_run, load_training_state,
                               lr_factor, measure_latency, progress_bar, sample_archs,
                               sandwich_step, save_checkpoint, save_training_state, set_backend,
                               train, trimmed_mean, warmup_cosine, warmup_cosine_factor)
from mos_models.common import checkpoint as ckpt_module

FUSED = [b for b in mos_kernels.available_backends("cpu") if b != "reference"]


def _enc(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# ElasticLinear

@pytest.mark.parametrize("n_in,n_out", [(7, 5), (16, 33), (1, 1)])
def test_standard_is_the_sliced_linear(n_in, n_out):
    torch.manual_seed(0)
    layer = ElasticLinear(16, 33, kind="standard", arch_dim=3)
    layer.set_arch(_enc(0.5, 1, 1), n_in, n_out)
    x = torch.randn(2, 3, n_in, requires_grad=True)
    y = layer(x)
    expected = F.linear(x, layer.weight[:n_out, :n_in], layer.bias[:n_out])
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    grad = layer.weight.grad
    assert grad[n_out:].abs().sum() == 0 and grad[:, n_in:].abs().sum() == 0
    assert grad[:n_out, :n_in].abs().sum() > 0
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and lin.weight.shape == (n_out, n_in)
    torch.testing.assert_close(lin(x.detach()), y.detach())


@pytest.mark.parametrize("kind", ["neuron", "layer"])
@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_mos_kinds_match_the_float64_oracle(kind, backend):
    torch.manual_seed(1)
    layer = ElasticLinear(12, 9, kind=kind, arch_dim=4, num_experts=3, router_hidden=8,
                          backend=backend)
    encoding = _enc(0.25, 0.5, 1.0, 0.75)
    layer.set_arch(encoding, 7, 5)
    x = torch.randn(6, 7, requires_grad=True)
    y = layer(x)
    y.sum().backward()

    mos = layer.mos
    params64 = [p.detach().double().requires_grad_() for p in
                (mos.experts, mos.bias, *mos.router.parameters())]
    experts, bias, w1, b1, w2, b2 = params64
    x64 = x.detach().double().requires_grad_()
    logits = F.linear(F.relu(F.linear(encoding.double(), w1, b1)), w2, b2)
    beta = logits.view(9, 3)[:5].softmax(-1) if kind == "neuron" else logits.softmax(-1)
    y64 = reference.mos_linear(x64, experts, beta, bias, out_features=5)
    y64.sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    for p, p64 in zip((mos.experts, mos.bias, *mos.router.parameters()), params64):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-5)

    torch.testing.assert_close(layer.to_linear()(x.detach()), y.detach(), rtol=1e-5, atol=1e-5)


def test_set_backend_switches_every_layer_and_keeps_outputs():
    torch.manual_seed(2)
    model = nn.Sequential(ElasticLinear(8, 6, kind="neuron", arch_dim=2),
                          ElasticLinear(6, 4, kind="layer", arch_dim=2))
    for layer in model:
        layer.set_arch(_enc(1, 0.5))
    x = torch.randn(5, 8)
    outputs = {}
    for backend in ["reference"] + FUSED:
        set_backend(model, backend)
        assert all(layer.backend == backend and layer.mos.backend == backend for layer in model)
        outputs[backend] = model(x)
    for y in outputs.values():
        torch.testing.assert_close(y, outputs["reference"], rtol=1e-5, atol=1e-5)
    for strategy in mos_kernels.STRATEGIES:  # the strategy reaches every MoSLinear
        set_backend(model, "auto", strategy=strategy)
        assert all(layer.strategy == strategy and layer.mos.strategy == strategy
                   for layer in model)
    with pytest.raises(ValueError, match="strategy must be one of"):
        set_backend(model, "auto", strategy="fastest")


@pytest.mark.parametrize("kind", ["standard", "neuron", "layer"])
def test_eval_cache_computes_weights_once_per_architecture(kind, monkeypatch):
    torch.manual_seed(3)
    layer = ElasticLinear(10, 8, kind=kind, arch_dim=2).eval()
    owner = layer.mos if layer.mos is not None else layer
    calls = []
    original = type(owner).collapsed_weights
    monkeypatch.setattr(type(owner), "collapsed_weights",
                        lambda self: calls.append(1) or original(self))
    x = torch.randn(3, 6)
    layer.set_arch(_enc(0.5, 1), 6, 4)
    with torch.no_grad():
        first = layer(x)
        for _ in range(4):
            torch.testing.assert_close(layer(x), first)
    assert len(calls) == 1
    with torch.no_grad():
        layer.set_arch(_enc(1, 1), 6, 8)
        layer(x)
        layer(x)
    assert len(calls) == 2
    with torch.no_grad():  # a parameter update invalidates the cache
        next(layer.parameters()).add_(1.0)
        layer(x)
    assert len(calls) == 3
    layer.train()
    layer(x)  # training mode never uses the cache
    assert len(calls) == 3 + (kind == "standard")


def test_elastic_linear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        ElasticLinear(4, 4, kind="expert")
    layer = ElasticLinear(4, 4, kind="neuron", arch_dim=3)
    with pytest.raises(ValueError, match="in_features"):
        layer.set_arch(_enc(1, 1, 1), 5, 4)
    with pytest.raises(ValueError, match="encoding"):
        layer.set_arch(None, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        layer.set_arch(_enc(1, 1), 4, 4)
    with pytest.raises(ValueError, match="backend"):
        layer.set_backend("gpu")
    layer.set_arch(_enc(1, 1, 1), 3, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        layer(torch.randn(2, 4))


def test_elastic_embedding_and_layer_norm_slice_and_export():
    torch.manual_seed(4)
    emb = ElasticEmbedding(11, 8, padding_idx=0).set_arch(5)
    tokens = torch.tensor([[0, 3, 10]])
    torch.testing.assert_close(emb(tokens), emb.weight[tokens][..., :5])
    torch.testing.assert_close(emb.to_embedding()(tokens), emb(tokens))
    norm = ElasticLayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_()
        norm.bias.uniform_()
    norm.set_arch(5)
    x = torch.randn(2, 5)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (5,), norm.weight[:5], norm.bias[:5]))
    torch.testing.assert_close(norm.to_layer_norm()(x), norm(x))
    with pytest.raises(ValueError, match="embedding_dim"):
        emb.set_arch(9)


# ---------------------------------------------------------------------------------------------
# checkpoints

def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_checkpoint({"a": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(ckpt_module.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint({"a": 2}, path)
    assert torch.load(path) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_atomic_files_get_a_plain_files_mode(tmp_path):
    """The temp file behind every atomic write is renamed into place: it must not keep
    mkstemp's private 0600 mode (a shared run directory would be unreadable to others)."""
    from mos_models.common.run import write_json
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = plain.stat().st_mode & 0o777
    for path in (write_json(tmp_path / "a.json", {"a": 1}),
                 save_checkpoint({"a": 1}, tmp_path / "state.pt")):
        assert path.stat().st_mode & 0o777 == expected, path


def test_training_state_round_trip_and_keep(tmp_path):
    torch.manual_seed(5)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = warmup_cosine(opt, 2, 10)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
    for step in (1, 2, 3):
        save_training_state(tmp_path, step, model, opt, sched, extra={"position": step * 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_2.pt", "checkpoint_3.pt"]
    assert latest_checkpoint(tmp_path).name == "checkpoint_3.pt"
    after_save = (torch.rand(3), random.random())

    model2 = nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    sched2 = warmup_cosine(opt2, 2, 10)
    np_after_save = np.random.rand(3)
    info = load_training_state(tmp_path, model2, opt2, sched2)
    assert info["step"] == 3 and info["extra"] == {"position": 21}
    torch.testing.assert_close(torch.rand(3), after_save[0])
    assert random.random() == after_save[1]
    assert np.array_equal(np.random.rand(3), np_after_save)  # numpy's state, as tensors
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q)
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"],
                               opt.state_dict()["state"][0]["exp_avg"])
    assert load_training_state(tmp_path / "empty", model2) is None


class Smuggled:
    """Stands for any pickled object: loading it would run code of the file's choosing."""


@pytest.mark.parametrize("payload", [Smuggled(), np.arange(3)], ids=["object", "ndarray"])
def test_a_checkpoint_carrying_a_pickled_object_is_refused(tmp_path, payload):
    path = tmp_path / "checkpoint_1.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": payload}, path)
    with pytest.raises(CheckpointError, match="holds pickled Python objects, which are not loaded"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint_1.pt"):  # names the file
        load_training_state(tmp_path, nn.Linear(2, 1), log=lambda m: None)


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_resume_skips_an_unreadable_newest_checkpoint(tmp_path, damage):
    torch.manual_seed(7)
    model = nn.Linear(3, 2)
    save_training_state(tmp_path, 1, model, extra={"seconds": 1.0})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    newest = save_training_state(tmp_path, 2, model)
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:200])
    else:
        newest.write_text("not a checkpoint at all\n")
    logged = []
    restored = nn.Linear(3, 2)
    info = load_training_state(tmp_path, restored, log=logged.append)
    assert info["step"] == 1 and info["extra"] == {"seconds": 1.0}
    assert len(logged) == 1 and "checkpoint_2.pt" in logged[0]
    assert "not a complete checkpoint" in logged[0]
    for key, value in restored.state_dict().items():
        assert torch.equal(value, expected[key])
    (tmp_path / "checkpoint_1.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint could be loaded"):
        load_training_state(tmp_path, restored, log=lambda m: None)


def test_gene_space_parses_every_arch_spec(tmp_path):
    space = GeneSpace({"a": [1, 2, 4], "b": [3, 5]})
    assert space.parse("largest") == {"a": 4, "b": 5}
    assert space.parse("smallest") == {"a": 1, "b": 3}
    assert space.parse({"a": 2, "b": 3}) == {"a": 2, "b": 3}
    assert space.parse('{"a": 2, "b": 5}') == {"a": 2, "b": 5}
    path = tmp_path / "search.json"
    path.write_text(json.dumps({"arch": {"a": 4, "b": 3}, "valid_loss": 1.0}))
    assert space.parse(str(path)) == {"a": 4, "b": 3}
    with pytest.raises(ValueError, match="not one of"):
        space.parse('{"a": 3, "b": 5}')
    with pytest.raises(ValueError, match="none of largest, smallest"):
        space.parse("biggest")


# ---------------------------------------------------------------------------------------------
# evolution

def test_evolutionary_search_is_deterministic_and_respects_the_constraint():
    space = GeneSpace({f"g{i}": [0, 1, 2, 3] for i in range(6)})
    constraint = lambda arch: sum(arch.values()) <= 9  # noqa: E731
    target = {"g0": 3, "g1": 0, "g2": 3, "g3": 0, "g4": 3, "g5": 0}
    fitness = lambda arch: sum((arch[k] - target[k]) ** 2 for k in arch)  # noqa: E731
    seen = []
    config = EvolutionConfig(iterations=8, population=30, parents=6, mutations=12, crossovers=12,
                             seed=7)
    result = evolutionary_search(space, lambda a: seen.append(a) or fitness(a), constraint, config)
    assert result.best == target and result.best_fitness == 0
    assert all(constraint(a) for a in seen)
    assert result.history == sorted(result.history, reverse=True)  # elitism: never worse
    assert result.evaluated == len({space.key(a) for a in seen}) == len(seen)  # scored once
    again = evolutionary_search(space, fitness, constraint, config)
    assert again.best == result.best and again.history == result.history
    with pytest.raises(RuntimeError, match="constraint"):
        evolutionary_search(space, fitness, lambda a: False,
                            EvolutionConfig(population=2, parents=1, max_tries=20))


def test_gene_space_basics():
    space = GeneSpace({"a": [1, 4, 2], "b": ["x"]})
    assert space.largest() == {"a": 4, "b": "x"} and space.smallest() == {"a": 1, "b": "x"}
    rng = random.Random(0)
    assert all(space.sample(rng)["a"] in (1, 2, 4) for _ in range(20))
    assert space.mutate({"a": 2, "b": "x"}, 0.0, rng) == {"a": 2, "b": "x"}
    with pytest.raises(ValueError, match="not one of"):
        space.validate({"a": 3, "b": "x"})
    with pytest.raises(ValueError, match="missing"):
        space.validate({"a": 1})
    cfg = EvolutionConfig()
    assert (cfg.iterations, cfg.population, cfg.parents, cfg.mutations, cfg.mutation_prob,
            cfg.crossovers) == (30, 125, 25, 50, 0.3, 50)


# ---------------------------------------------------------------------------------------------
# training helpers

class ToySupernet(nn.Module):
    """Two MoS layers whose hidden width is the only gene."""

    space = GeneSpace({"hidden": [3, 6, 12]})

    def __init__(self):
        super().__init__()
        self.fc1 = ElasticLinear(5, 12, kind="neuron", arch_dim=1, router_hidden=4)
        self.fc2 = ElasticLinear(12, 2, kind="neuron", arch_dim=1, router_hidden=4)

    def set_arch(self, arch):
        enc = torch.tensor([arch["hidden"] / 12])
        self.fc1.set_arch(enc, 5, arch["hidden"])
        self.fc2.set_arch(enc, arch["hidden"], 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def compile_units(self):
        return [self.fc1, self.fc2]

    def hparams(self):
        return {}


def _toy_loss(x, y):
    return lambda model, arch: F.mse_loss(model(x), y)


def test_sampling_and_sandwich_step_sum_gradients():
    space = ToySupernet.space
    archs = sample_archs(space, arch_rng(1, 5))
    assert archs[:2] == [space.largest(), space.smallest()]
    assert archs == sample_archs(space, arch_rng(1, 5))  # same seed and step: same draw
    assert len(sample_archs(space, arch_rng(1, 5), "spos")) == 1
    with pytest.raises(ValueError, match="mode"):
        sample_archs(space, arch_rng(1, 5), "all")

    torch.manual_seed(6)
    model = ToySupernet()
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    losses = sandwich_step(model, archs, _toy_loss(x, y))
    summed = {n: p.grad.clone() for n, p in model.named_parameters()}
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for arch, loss in zip(archs, losses):
        model.zero_grad()
        model.set_arch(arch)
        single = F.mse_loss(model(x), y)
        assert single.item() == pytest.approx(loss)
        single.backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad
    for n in summed:
        torch.testing.assert_close(summed[n], expected[n])


def test_mixed_precision_step():
    with pytest.raises(ValueError, match=r"amp must be one of \('off', 'bf16', 'fp16'\)"):
        MixedPrecision("fp8")
    space = ToySupernet.space
    archs = sample_archs(space, arch_rng(1, 5))
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    torch.manual_seed(6)
    reference_model = ToySupernet()
    sandwich_step(reference_model, archs, _toy_loss(x, y))
    for mode in ("bf16", "fp16"):
        torch.manual_seed(6)
        model = ToySupernet()
        precision = MixedPrecision(mode, "cpu")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = sandwich_step(model, archs, _toy_loss(x, y), precision)
        assert all(torch.isfinite(torch.tensor(losses)))
        if mode == "fp16":  # the loss was scaled: gradients are 2**16 times the fp32 ones
            assert precision.scaler.get_scale() == 2.0**16
        norm = precision.step(optimizer, model.parameters(), clip_norm=1e9)
        for (n, p), q in zip(model.named_parameters(), reference_model.parameters()):
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
            # after unscale_, the gradients are the fp32 ones up to the autocast rounding
            torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=0.05 * q.grad.abs().max())
        assert torch.isfinite(norm)


def test_warmup_cosine_and_progress_bar():
    assert warmup_cosine_factor(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine_factor(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine_factor(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(99, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    stream = io.StringIO()
    bar = progress_bar(10, "train", file=stream)
    bar.update(3)
    bar.set_postfix(loss=1.5)
    bar.close()
    assert "3/10" in stream.getvalue() and "loss=1.5" in stream.getvalue()


def test_the_one_schedule_counts_steps_or_time():
    for step in (0, 3, 12, 20, 99):  # without a time budget: warmup + cosine over the steps
        assert lr_factor(step, 4, 20, 0.1) == warmup_cosine_factor(step, 4, 20, 0.1)
    assert lr_factor(2, 4, 20, time_fraction=0.9) == pytest.approx(0.75)  # warmup: real steps
    # after the warmup the cosine follows whichever is further along, steps or time
    assert lr_factor(12, 4, 20, time_fraction=0.1) == pytest.approx(0.5)
    assert lr_factor(5, 4, 20, time_fraction=0.6) == pytest.approx(warmup_cosine_factor(12, 4, 20))
    assert lr_factor(5, 4, 20, 0.02, time_fraction=1.0) == pytest.approx(0.02)


def test_timing_helpers():
    assert trimmed_mean([100.0, 1.0, 2.0, 3.0, -50.0], trim=0.2) == pytest.approx(2.0)
    assert measure_latency(lambda: sum(range(100)), warmup=1, runs=5) > 0
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean([1.0], trim=0.5)


# ---------------------------------------------------------------------------------------------
# DDP: two processes on CPU (gloo)

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mos_models.common import cleanup_distributed, init_distributed, wrap_ddp
    info = init_distributed("cpu")
    torch.manual_seed(0)  # identical initial weights
    model = ToySupernet()
    local = ToySupernet()
    local.load_state_dict(model.state_dict())
    ddp = wrap_ddp(model, info)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    x, y = torch.randn(4, 5, generator=gen), torch.randn(4, 2, generator=gen)
    archs = sample_archs(ToySupernet.space, arch_rng(3, 1))
    sandwich_step(ddp, archs, _toy_loss(x, y))
    sandwich_step(local, archs, _toy_loss(x, y))
    torch.save({"archs": archs, "ddp": {n: p.grad for n, p in model.named_parameters()},
                "local": {n: p.grad for n, p in local.named_parameters()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    del ddp  # its reducer holds the process group: destroyed after it, gloo's teardown can hang
    cleanup_distributed()


def test_ddp_two_processes_average_the_sandwich_gradients(tmp_path):
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)),
                                          nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["archs"] == r1["archs"]
    for name, grad in r0["ddp"].items():
        expected = (r0["local"][name] + r1["local"][name]) / 2
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1["ddp"][name], expected, rtol=1e-5, atol=1e-6)
    assert any((r0["local"][n] - r1["local"][n]).abs().sum() > 0 for n in r0["local"])


def test_fused_adam_where_torch_has_it():
    model = nn.Linear(4, 3)
    assert fused_adam_options(model.parameters()) == {"fused": True}
    opt = torch.optim.AdamW(model.parameters(), **fused_adam_options(model.parameters()))
    model(torch.randn(2, 4)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)
    assert fused_adam_options([torch.zeros(2, device="meta")]) == {}
    assert fused_adam_options([]) == {}


# ---------------------------------------------------------------------------------------------
# the training core, with a task as small as a task can be

@dataclass
class ToyConfig:
    examples: int = 64


class ToyTask(Task):
    """Regression on fixed random data: what a model family gives the training core."""

    name = "toy"
    config_class = ToyConfig
    model_from_config = staticmethod(lambda model_config: ToySupernet())

    def train_defaults(self):
        return {"max_steps": 12, "lr": 1e-2, "warmup_steps": 2}

    def setup(self, info, cfg, log):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.config.examples, 5, generator=g)
        self.y = torch.randn(self.config.examples, 2, generator=g)

    def build_model(self):
        return ToySupernet()

    def batch(self, step):
        start = (step * 8) % self.config.examples
        return self.x[start:start + 8].clone(), self.y[start:start + 8].clone()

    def loss(self, model, batch, arch, shared):
        return F.mse_loss(model(batch[0]), batch[1])

    def evaluate(self, model):
        model.set_arch(model.space.largest())
        with torch.no_grad():
            return {"valid_mse": float(F.mse_loss(model(self.x), self.y))}


def _logged(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_the_training_core_runs_a_task_and_resumes_it_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = train(ToyTask(ToyConfig()), TrainConfig(str(straight), seed=5, save_every=4,
                                                     log_every=1, progress=False),
                   log=lambda m: None)
    assert result["step"] == 12 and "valid_mse" in result
    config = json.loads((straight / "config.json").read_text())
    assert config["format"] == "mos-run/1" and config["task"] == "toy"
    assert config["train"]["max_steps"] == 12 and config["train"]["lr"] == 1e-2  # task defaults
    assert json.loads((straight / "metrics.json").read_text())["step"] == 12
    records = _logged(straight)
    assert [r["step"] for r in records[:-1]] == list(range(1, 13)) and "final" in records[-1]
    assert all(len(r["losses"]) == 3 for r in records[:-1])  # sandwich: three architectures
    assert records[0]["lr"] == pytest.approx(0.5e-2)  # warmup over two steps
    killed.mkdir()
    for name in ("config.json", "checkpoint_8.pt"):
        (killed / name).write_bytes((straight / name).read_bytes())
    train(ToyTask(ToyConfig()), TrainConfig(str(killed), resume=True, log_every=1,
                                            progress=False),
          log=lambda m: None)  # the run's own seed and steps win over these defaults
    model, run = load_run(killed, ToyTask)
    expected, _ = load_run(straight, ToyTask)
    assert run.step == 12 and run.task_config == ToyConfig()
    for (name, p), q in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(p, q), name
    assert [r["losses"] for r in _logged(killed)[:-1]] == [r["losses"] for r in records[8:-1]]


def test_compile_trains_and_compiles_each_block_size_once(tmp_path):
    """--compile compiles the model's blocks (compile_units), one graph per block size: the
    architectures of a second run, drawn from another seed, compile nothing new. aot_eager:
    dynamo's and AOTAutograd's graphs (forward and backward) without code generation."""
    def run(name, seed, compile):
        out = tmp_path / name
        result = train(ToyTask(ToyConfig()), TrainConfig(str(out), seed=seed, log_every=1,
                                                          progress=False, compile=compile,
                                                          compile_backend="aot_eager"),
                       log=lambda m: None)
        return result, [r["losses"] for r in _logged(out)[:-1]]

    compiled, compiled_losses = run("compiled", 1, True)
    _, eager_losses = run("eager", 1, False)
    sizes = len(ToySupernet.space.genes["hidden"])
    assert 0 < compiled["compiled_graphs"] <= 2 * sizes  # fc1 and fc2 at three widths each
    for a, b in zip(compiled_losses, eager_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    again, _ = run("again", 2, True)
    assert again["compiled_graphs"] == 0
    assert not hasattr(compiled["model"].fc1, "_orig_mod")  # evaluated and returned eagerly
