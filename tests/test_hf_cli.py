"""Tests of ``python -m mos_models.hf`` (train, evaluate, search, export) and of its task on the
training core, on tiny BERT and Llama models built from configs and saved with save_pretrained
beside a word-level tokenizer of the embedded corpus (no download). CPU only, seconds."""
import json
import math
import os
import random
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"   # nothing may download a model

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (the hf extra)")
pytest.importorskip("safetensors", reason="safetensors is not installed (the hf extra)")

from mos_models import hf  # noqa: E402
from mos_models.common import DistInfo, TrainConfig, sample_archs, sandwich_step  # noqa: E402
from mos_models.hf.__main__ import main  # noqa: E402
from mos_models.hf.tiny import save_tiny, word_tokenizer  # noqa: E402
from mos_models.hf.train import HFConfig, HFTask, load_run  # noqa: E402

FAMILIES = ("bert", "llama")
TRAIN = ["--batch-size", "4", "--max-length", "24", "--router-hidden", "16", "--no-progress",
         "--log-every", "1"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    # weights larger than the 0.02 init, so that sub-networks differ visibly
    return {family: save_tiny(str(root / family), family, initializer_range=0.2)
            for family in FAMILIES}


def _task(model_dir, **settings):
    task = HFTask(HFConfig(model=model_dir, batch_size=4, max_length=24, router_hidden=16,
                           **settings))
    task.setup(DistInfo(), TrainConfig(out=""), log=lambda m: None)
    torch.manual_seed(0)
    return task, task.build_model().train()


def _mos_grads(sn, active):
    """(expert gradient sums, router gradient sums) of the FFN linears of the active layers."""
    experts, routers = [], []
    for i, layer in enumerate(sn.layer_list.physical()):
        if i in active:
            for lin in sum(sn.ffn_linears(layer), []):
                experts.append(lin.mos.experts.grad.abs().sum().item())
                routers.append(sum(p.grad.abs().sum().item() for p in lin.mos.router.parameters()))
    return experts, routers


@pytest.mark.parametrize("family", FAMILIES)
def test_sandwich_step_with_in_place_distillation(model_dirs, family):
    task, sn = _task(model_dirs[family])
    assert task.kind == ("cosine" if family == "bert" else "kl")
    assert task.causal == (family == "llama")
    batch = task.batch(0)
    archs = sample_archs(sn.space, random.Random(3), "sandwich")

    def step():
        shared = {}
        return sandwich_step(sn, archs, lambda net, arch: task.loss(net, batch, arch, shared))
    losses = step()
    assert all(math.isfinite(v) for v in losses) and losses[1] > 0
    if family == "llama":   # the full size is the teacher before training: LM loss, KL ~ 0
        with torch.no_grad():
            lm = task.teacher(**batch[0], labels=batch[1]).loss.item()
        assert losses[0] == pytest.approx(lm, rel=1e-4)
        sn.set_arch(archs[1])
        with torch.no_grad():   # the smallest: its LM loss plus a KL that is not zero
            assert losses[1] > sn(**batch[0], labels=batch[1]).loss.item() + 1e-5
    else:                   # cosine distance alone; without dropout the full size is exact
        sn.eval().set_arch(archs[0])
        with torch.no_grad():
            assert task.loss(sn, batch, archs[0], {}).item() < 1e-6
        sn.train()
    # identical experts get no router gradient (softmax weights sum to 1); one update of the
    # sandwich's summed gradients sets them apart, and then every expert and router learns
    optimizer = task.optimizer(sn, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lin = sn.ffn_linears(sn.layer_list.physical()[0])[0][0]
    assert not torch.equal(lin.mos.experts[0], lin.mos.experts[1])
    step()
    experts, routers = _mos_grads(sn, set(range(3)))
    assert min(experts) > 0 and min(routers) > 1e-3 * max(routers) > 0
    assert all(p.grad is None for p in task.teacher.parameters())


def test_largest_teacher(model_dirs):
    task, sn = _task(model_dirs["llama"], teacher="largest")
    batch = task.batch(1)
    archs = sample_archs(sn.space, random.Random(0), "sandwich")
    shared = {}
    losses = sandwich_step(sn, archs, lambda net, arch: task.loss(net, batch, arch, shared))
    sn.set_arch(archs[0])
    with torch.no_grad():
        lm = sn(**batch[0], labels=batch[1]).loss.item()
    assert losses[0] == pytest.approx(lm, rel=1e-5)   # the largest: LM loss alone
    assert shared["teacher"].logits.grad_fn is None   # its output, kept without its graph
    assert losses[1] > losses[0]
    with pytest.raises(ValueError, match="--teacher largest needs a task loss"):
        _task(model_dirs["bert"], teacher="largest")


def _train(model_dir, out, *extra):
    main(["train", "--model", model_dir, "--out", str(out), "--max-steps", "4",
          "--save-every", "2", *TRAIN, *extra])


def _logged(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for family in FAMILIES:
        _train(model_dirs[family], root / family)
        out[family] = root / family
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_train_writes_a_run_and_resume_continues_exactly(runs, model_dirs, family, tmp_path):
    straight = runs[family]
    config = json.loads((straight / "config.json").read_text())
    assert config["task"] == "hf" and config["format"] == "mos-run/1"
    assert config["task_config"]["model"] == os.path.abspath(model_dirs[family])
    assert config["model"]["source_dir"] == os.path.abspath(model_dirs[family])
    metrics = json.loads((straight / "metrics.json").read_text())
    metric = "perplexity" if family == "llama" else "teacher_cosine"
    assert metrics["step"] == 4 and math.isfinite(metrics[f"{metric}_smallest"])
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("config.json", "checkpoint_2.pt"):
        shutil.copyfile(straight / name, killed / name)
    main(["train", "--model", "ignored-on-resume", "--out", str(killed), "--resume",
          "--no-progress", "--log-every", "1"])   # the run's own settings win, but runtime's
    model, run = load_run(killed, log=lambda m: None)
    expected, _ = load_run(straight, log=lambda m: None)
    assert run.step == 4
    for (name, p), q in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(p, q), name
    assert [r["losses"] for r in _logged(killed)[:-1]] == \
        [r["losses"] for r in _logged(straight)[2:-1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_search_export(runs, family, tmp_path):
    run = runs[family]
    metric = "perplexity" if family == "llama" else "teacher_cosine"
    main(["evaluate", "--run", str(run), "--json", str(tmp_path / "full.json")])
    full = json.loads((tmp_path / "full.json").read_text())
    final = json.loads((run / "metrics.json").read_text())
    assert full[metric] == pytest.approx(final[f"{metric}_largest"], rel=1e-6)
    assert full["arch"] == {"ffn": 48, "layers": 3}
    main(["evaluate", "--run", str(run), "--ffn", "24", "--layers", "2", "--json",
          str(tmp_path / "small.json")])
    small = json.loads((tmp_path / "small.json").read_text())
    assert small["arch"] == {"ffn": 24, "layers": 2} and small["params"] < full["params"]
    budget = (small["params"] + full["params"]) // 2
    main(["search", "--run", str(run), "--max-params", str(budget), "--json",
          str(tmp_path / "search.json")])
    found = json.loads((tmp_path / "search.json").read_text())
    scores = [c[metric] for c in found["candidates"]]
    assert found["params"] <= budget and found["skipped_over_budget"] > 0
    assert found[metric] == (min(scores) if family == "llama" else max(scores))
    _check_export(run, tmp_path / "export", family)


def _check_export(run, out, family):
    main(["export", "--run", str(run), "--ffn", "24", "--layers", "2", "--out", str(out)])
    sn, _ = load_run(run, log=lambda m: None)
    sn.set_arch(ffn=24, layers=2)
    auto = transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModel
    loaded = auto.from_pretrained(str(out), local_files_only=True).eval()
    assert (loaded.config.intermediate_size, loaded.config.num_hidden_layers) == (24, 2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    batch = hf.text_batches(tokenizer, hf.default_corpus()[:5], 5, 24)[0]
    with torch.no_grad():
        got, want = loaded(**batch), sn(**batch)
    key = "logits" if family == "llama" else "last_hidden_state"
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(getattr(got, key)[mask], getattr(want, key)[mask],
                               rtol=1e-5, atol=1e-5)


def _fails(argv, *patterns):
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    for pattern in patterns:
        assert pattern in message, message


def test_clear_errors(runs, tmp_path):
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(gpt2)
    word_tokenizer(["a b c"]).save_pretrained(gpt2)
    _fails(["train", "--model", str(gpt2), "--out", str(tmp_path / "r1"), *TRAIN],
           "GPT2LMHeadModel", "not a supported model family", "BERT-style encoder",
           "Llama-style decoder")
    (tmp_path / "empty").mkdir()
    _fails(["train", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "r2")],
           "not a Hugging Face model directory")
    _fails(["evaluate", "--run", str(runs["bert"]), "--ffn", "64", "--json",
            str(tmp_path / "x.json")], "ffn = 64 is outside the space", "1..48")
    _fails(["export", "--run", str(runs["llama"]), "--layers", "0", "--out",
            str(tmp_path / "x")], "layers = 0 is outside the space")
    _fails(["search", "--run", str(runs["llama"]), "--max-params", "10", "--json",
            str(tmp_path / "s.json")], "below the smallest architecture's")
    assert not (tmp_path / "x").exists()


def test_data_directory_and_held_out_split(model_dirs, tmp_path):
    (tmp_path / "text").mkdir()
    lines = [f"sentence number {i} about the river and the bread" for i in range(12)]
    (tmp_path / "text" / "a.txt").write_text("\n".join(lines[:7]) + "\n")
    (tmp_path / "text" / "b.txt").write_text("\n".join(lines[7:]) + "\n")
    task, _ = _task(model_dirs["bert"], data=str(tmp_path / "text"), valid_every=4)
    assert task.valid == [lines[3], lines[7], lines[11]]
    assert task.texts == [t for t in lines if t not in task.valid]
    inputs, labels = task.batch(1)
    assert inputs["input_ids"].shape[0] == 4 and labels is None
    with pytest.raises(FileNotFoundError, match="--data"):
        _task(model_dirs["bert"], data=str(tmp_path / "missing"))
