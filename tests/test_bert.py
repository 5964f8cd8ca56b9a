"""Tests of the BERT supernet (mos_models.bert): masking, spaces and encodings, export,
sandwich training, resume, and the command line. Small spaces and data so each runs in seconds."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from mos_kernels import MoSLinear
from mos_models.bert import data as bdata
from mos_models.bert.__main__ import main as cli
from mos_models.bert.export import load_exported, save_exported
from mos_models.bert.model import BertSupernet, param_count
from mos_models.bert.space import (HomogeneousSpace, SuperShaperSpace, get_space,
                                   space_from_dict)
from mos_models.bert.train import BertConfig, load_run, train
from mos_models.common import (TrainConfig, latest_checkpoint, load_checkpoint, sample_archs,
                               sandwich_step)

MICRO = {
    "supershaper": SuperShaperSpace(backbone=32, num_layers=3, hidden_choices=(8, 16, 24, 32),
                                    heads=4, ffn=48),
    "homogeneous": HomogeneousSpace(layer_choices=(1, 2, 3), hidden_choices=(16, 24, 32),
                                    head_choices=(2, 4), ffn_ratios=(2.0, 2.5, 4.0)),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small corpus: the cleaned docstrings of the stdlib's email and json packages."""
    import email
    import json as json_pkg
    docs = []
    for pkg in (email, json_pkg):
        docs += bdata.stdlib_documents(os.path.dirname(pkg.__file__))
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n".join(text for _, text in docs) + "\n")
    out = tmp_path_factory.mktemp("data")
    bdata.prepare(str(out), [str(path)], vocab_size=300, valid_percent=20)
    return str(out)


# ---------------------------------------------------------------------------------------------
# data

def test_masking_statistics():
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    ids = torch.randint(bdata.NUM_SPECIAL, vocab, (400, 512), generator=g)
    ids[:, 0], ids[:, -1], ids[::7, 100:140] = bdata.CLS, bdata.SEP, bdata.PAD
    inputs, labels = bdata.mask_tokens(ids, vocab, torch.Generator().manual_seed(1))
    special = ids < bdata.NUM_SPECIAL
    chosen = labels != -100
    assert not (chosen & special).any()
    assert torch.equal(inputs[special], ids[special])          # specials never touched
    assert torch.equal(inputs[~chosen], ids[~chosen])          # only chosen positions change
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.003, rate
    n = chosen.sum().item()
    masked = (inputs[chosen] == bdata.MASK).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(replaced - 0.1 * (1 - 1 / vocab)) < 0.01, (masked,
                                                                                       replaced)
    assert (inputs[chosen & (inputs != bdata.MASK)] >= bdata.NUM_SPECIAL).all()
    again = bdata.mask_tokens(ids, vocab, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    with pytest.raises(TypeError, match="int64"):
        bdata.mask_tokens(ids.int(), vocab)


def test_cleaning_and_split():
    assert bdata.clean_paragraph(["Return the :func:`len` of ``x``, counting every item",
                                  "in the *whole* sequence."]) == \
        "Return the len of x, counting every item in the whole sequence."
    assert bdata.clean_paragraph([">>> f(1)", "2"]) is None
    assert bdata.clean_paragraph(["Example::", "    x = y[0] + z"]) is None
    assert bdata.clean_paragraph(["x_1 = foo(bar) {baz} [qux] <a> |b|"]) is None
    assert bdata.clean_paragraph(["Too short."]) is None
    docs = [(f"mod{i % 200}.py", f"sentence number {i}") for i in range(2000)]
    train, valid = bdata.split_documents(docs, 10)
    assert (train, valid) == bdata.split_documents(list(docs), 10)
    valid_mods = {m for m, t in docs if t in set(valid)}
    assert valid_mods and not valid_mods & {m for m, t in docs if t in set(train)}


def test_prepared_data(data_dir):
    meta = bdata.load_meta(data_dir)
    tok = bdata.Tokenizer(os.path.join(data_dir, "spm.model"))
    assert meta["vocab_size"] == tok.vocab_size == 300
    assert tok.decode(tok.encode("Return the message payload.")) == "Return the message payload."
    blocks = bdata.load_blocks(data_dir, "train", 32)
    assert blocks.shape[1] == 32 and (blocks[:, 0] == bdata.CLS).all()
    assert (blocks[:, -1] == bdata.SEP).all() and blocks.max() < 300
    assert (blocks[:, 1:-1] != bdata.CLS).all() and (blocks != bdata.MASK).all()


# ---------------------------------------------------------------------------------------------
# spaces and encodings

def test_full_spaces_match_the_paper():
    ss, hom = get_space("supershaper", "full"), get_space("homogeneous", "full")
    assert ss.size() == 7 ** 12 and hom.size() == 55 * 2 * 5 == 550
    layout = ss.layout(ss.largest())
    assert layout.embed_dim == 768 and layout.layers == ((768, 12, 3072),) * 12
    arch = {"layers": 12, "hidden": 540, "heads": 6, "ffn_ratio": 2.5}
    assert hom.layout(arch) == (540, ((540, 6, 1350),) * 12)
    assert hom.encode(arch) == [1.0, 540 / 768, 2.5 / 4, 0.5]
    for preset in ("tiny", "full"):
        for name in ("supershaper", "homogeneous"):
            space = get_space(name, preset)
            assert space_from_dict(space.to_dict()).genes == space.genes


@pytest.mark.parametrize("name", ["supershaper", "homogeneous"])
@pytest.mark.parametrize("preset", ["tiny", "full"])
def test_sampling_and_encodings(name, preset):
    space = get_space(name, preset)
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(2000)]
    for arch in archs[:50] + [space.largest(), space.smallest()]:
        assert space.validate(arch) == arch
        enc = space.encode(arch)
        assert len(enc) == space.arch_dim and all(0 < v <= 1 for v in enc)
        layout = space.layout(arch)
        for hidden, heads, ffn in layout.layers:
            assert hidden % heads == 0 and ffn >= hidden
        child = space.mutate(arch, 0.3, rng)
        assert space.validate(child) == child
        assert space.validate(space.crossover(arch, archs[0], rng))
    assert space.encode(space.largest()) == [1.0] * space.arch_dim
    for gene, choices in space.genes.items():   # uniform sampling reaches every choice
        assert {a[gene] for a in archs} == set(choices)
    if name == "supershaper":
        arch = space.sample(random.Random(3))
        top = max(space.hidden_choices)
        assert space.encode(arch) == [arch[f"hidden_{i + 1}"] / top
                                      for i in range(space.num_layers)]
    bad = dict(space.largest())
    bad[next(iter(bad))] = 7
    with pytest.raises(ValueError, match="not one of"):
        space.encode(bad)


# ---------------------------------------------------------------------------------------------
# model and export

@pytest.mark.parametrize("name", ["supershaper", "homogeneous"])
@pytest.mark.parametrize("kind,pre_norm", [("neuron", False), ("layer", False),
                                           ("standard", False), ("neuron", True)])
def test_export_matches_supernet(name, kind, pre_norm, tmp_path):
    torch.manual_seed(0)
    space = MICRO[name]
    model = BertSupernet(space, 97, 16, supernet=kind, router_hidden=16, pre_norm=pre_norm)
    # move MoS routers off their initial point so the expert mix is not uniform
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router" in n:
                p.add_(torch.randn_like(p))
    ids = torch.randint(bdata.NUM_SPECIAL, 97, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 11:] = False
    archs = [space.largest(), space.smallest()] + [space.sample(random.Random(s))
                                                   for s in range(3)]
    for arch in archs:
        model.set_arch(arch).eval()
        with torch.no_grad():
            expected = model(ids, attention_mask=mask)
        static = model.export()
        assert not any(isinstance(m, type(model.layers[0].ffn1)) for m in static.modules())
        assert not any("router" in n or "experts" in n for n, _ in static.named_parameters())
        with torch.no_grad():
            got = static(ids, attention_mask=mask)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert sum(p.numel() for p in static.parameters()) == model.param_count(arch)
    # round trip through a directory, rebuilt from the layout alone
    info = save_exported(static, str(tmp_path), model.layout(), space.bottleneck)
    loaded, cfg = load_exported(str(tmp_path))
    assert cfg["params"] == info["params"] and loaded.pre_norm == pre_norm
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask), got)


def test_exported_model_fine_tunes_on_its_own():
    torch.manual_seed(0)
    space = MICRO["supershaper"]
    static = BertSupernet(space, 97, 16, router_hidden=16).export(space.sample(random.Random(1)))
    static.train()
    ids = torch.randint(bdata.NUM_SPECIAL, 97, (8, 16))
    inputs, labels = bdata.mask_tokens(ids, 97, torch.Generator().manual_seed(0), 0.5)
    opt = torch.optim.AdamW(static.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = static(inputs, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in static.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


def test_param_count_formula():
    space = get_space("homogeneous", "full")
    arch = {"layers": 12, "hidden": 768, "heads": 12, "ffn_ratio": 4.0}
    n = param_count(space.layout(arch), 30522, 512, False)
    # BERT-base without token types and pooler: 109.48M - 1536 - 590592, plus the MLM head
    assert n == 109_482_240 - 2 * 768 - (768 * 768 + 768) + (768 * 768 + 768 + 2 * 768 + 30522)


def test_bad_inputs():
    model = BertSupernet(MICRO["homogeneous"], 50, 8, router_hidden=8)
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError):
        model.set_arch({"layers": 2})


# ---------------------------------------------------------------------------------------------
# training

def test_sandwich_step_sums_the_three_gradients():
    torch.manual_seed(0)
    space = MICRO["homogeneous"]
    model = BertSupernet(space, 97, 16, supernet="neuron", router_hidden=16, dropout=0.0)
    ids = torch.randint(bdata.NUM_SPECIAL, 97, (4, 16))
    inputs, labels = bdata.mask_tokens(ids, 97, torch.Generator().manual_seed(0), 0.3)
    archs = sample_archs(space, random.Random(5), "sandwich")
    assert archs[0] == space.largest() and archs[1] == space.smallest()
    losses = sandwich_step(model, archs, lambda net, arch: net(inputs, labels))
    summed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    expected = {}
    for arch in archs:
        model.zero_grad()
        model.set_arch(arch)
        model(inputs, labels).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] = expected.get(n, 0) + p.grad
    assert summed.keys() == expected.keys()
    for n in summed:
        torch.testing.assert_close(summed[n], expected[n], rtol=1e-5, atol=1e-7)
    assert any("router" in n and g.abs().sum() > 0 for n, g in summed.items())
    assert losses[0] != losses[1]


def _train(data_dir, out, task=None, **kw):
    """BERT training on a micro SuperShaper space: ``task`` overrides BertConfig, ``kw``
    TrainConfig."""
    config = dict(data=data_dir, supernet="neuron", seq_len=32, batch_size=4, router_hidden=16,
                  space_def=MICRO["supershaper"].to_dict())
    config.update(task or {})
    base = dict(out=str(out), max_steps=6, warmup_steps=2, device="cpu", progress=False)
    base.update(kw)
    return train(BertConfig(**config), TrainConfig(**base), log=lambda *a: None)


@pytest.mark.parametrize("amp", ["off", "fp16"])  # fp16: the loss scaler's state resumes too
def test_resume_continues_exactly(data_dir, tmp_path, amp):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train(data_dir, straight, amp=amp, save_every=3)
    killed.mkdir()
    for name in ("config.json", "checkpoint_3.pt"):
        shutil.copy(straight / name, killed / name)  # as if killed right after step 3
    (killed / "checkpoint_5.pt").write_text("not a checkpoint")  # nor is the newest readable
    with pytest.raises(FileExistsError, match="--resume"):
        _train(data_dir, killed, amp=amp, save_every=3)
    metrics = _train(data_dir, killed, amp=amp, save_every=3, resume=True)
    assert metrics["step"] == 6
    a, run_a = load_run(str(straight))
    b, run_b = load_run(str(killed))
    assert run_a.step == run_b.step == 6
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    extras = [load_checkpoint(latest_checkpoint(str(tmp_path / run)))["extra"]
              for run in ("straight", "killed")]
    assert extras[0]["scaler"] == extras[1]["scaler"]


def test_save_mixed_weight_trains_like_the_fused_op(data_dir, tmp_path):
    _train(data_dir, tmp_path / "fused")
    trained = _train(data_dir, tmp_path / "saved", save_mixed_weight=True)["model"]
    a, _ = load_run(str(tmp_path / "fused"))
    b, run = load_run(str(tmp_path / "saved"))
    layers = [m for m in trained.modules() if isinstance(m, MoSLinear)]
    assert run.config["train"]["save_mixed_weight"] and layers
    assert all(m.save_mixed_weight for m in layers)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_cli_pipeline(data_dir, tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    cli(["train", "--data", data_dir, "--out", run, "--preset", "tiny", "--space",
         "homogeneous", "--supernet", "layer", "--steps", "2", "--batch-size", "4",
         "--seq-len", "32", "--router-hidden", "16", "--device", "cpu", "--save-mixed-weight"])
    cli(["evaluate", "--run", run, "--arch", "smallest", "--json", out + "/eval.json"])
    ev = json.load(open(out + "/eval.json"))
    assert ev["vocab_size"] == 300 and ev["perplexity"] > 1
    model, _ = load_run(run)
    budget = (model.param_count(model.space.smallest()) + model.param_count()) // 2
    cli(["search", "--run", run, "--max-params", str(budget), "--iterations", "2",
         "--population", "6", "--parents", "3", "--mutations", "3", "--crossovers", "3",
         "--valid-blocks", "8", "--json", out + "/search.json"])
    found = json.load(open(out + "/search.json"))
    assert found["params"] <= budget and model.param_count(found["arch"]) == found["params"]
    cli(["export", "--run", run, "--arch", out + "/search.json", "--out", out + "/model"])
    cli(["evaluate", "--model", out + "/model", "--data", data_dir, "--json", out + "/m.json"])
    cli(["evaluate", "--run", run, "--arch", out + "/search.json", "--json", out + "/s.json"])
    m, s = json.load(open(out + "/m.json")), json.load(open(out + "/s.json"))
    assert m["params"] == s["params"] == found["params"]
    assert abs(m["perplexity"] - s["perplexity"]) < 1e-3 * s["perplexity"]
    assert os.path.exists(out + "/model/spm.model")


def test_ddp_two_processes(data_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) trains and checkpoints like one process does."""
    run = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "mos_models.bert", "train", "--data", data_dir,
           "--out", run, "--steps", "2", "--batch-size", "2", "--seq-len", "32",
           "--router-hidden", "16", "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout + done.stderr
    _, trained = load_run(run)
    assert trained.step == 2
