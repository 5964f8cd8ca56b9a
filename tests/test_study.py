"""Tests of the supernet-quality study (mos_models.common.study and the MT/BERT families):
the metrics against scipy and hand-checked cases, the architecture picker, standalone models
trained from scratch, resume of a killed study, and end-to-end micro studies."""
import json
import math
import os
import random

import pytest
import torch

from mos_models.bert import data as bdata
from mos_models.bert.__main__ import main as bert_cli
from mos_models.bert.model import param_count as bert_param_count
from mos_models.bert.space import get_space
from mos_models.common import study as study_module
from mos_models.common import trainer
from mos_models.common.study import kendall_tau, mae, mean_gap, pick_architectures
from mos_models.mt import PRESETS
from mos_models.mt.__main__ import main as mt_cli
from mos_models.mt.config import MTSpace
from mos_models.mt.data import build_corpus
from mos_models.mt.export import load_static, save_static
from mos_models.mt.model import StaticTransformer, param_count
from mos_models.mt.train import MTConfig, MTTask, load_run
from test_mt import fake_locale


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mt_data(tmp_path_factory):
    root = fake_locale(tmp_path_factory.mktemp("locale"))
    out = tmp_path_factory.mktemp("mt_data")
    build_corpus(out, "xx", root, valid_fraction=0.15, test_fraction=0.15, vocab_size=50,
                 log=lambda msg: None)
    return str(out)


# ---------------------------------------------------------------------------------------------
# metrics

def test_metrics_on_hand_checked_cases():
    assert mae([1.0, 2.0, 4.0], [2.0, 2.0, 1.0]) == pytest.approx(4 / 3)
    assert mean_gap([1.0, 2.0, 4.0], [2.0, 2.0, 1.0]) == pytest.approx(2 / 3)
    # 6 pairs, one discordant (2 and 3 swapped): (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # ties (tau-b): pairs (1,2) tied in x, (2,3) tied in y, the other 4 concordant:
    # 4 / sqrt((6 - 1) * (6 - 1)) = 0.8
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    # a pair tied in both is neither concordant nor discordant but counts as a tie on both
    # sides: (0,1) tied; (0,2), (1,2) concordant: 2 / sqrt((3 - 1) * (3 - 1)) = 1
    assert kendall_tau([1, 1, 2], [5, 5, 6]) == pytest.approx(1.0)
    # ... and with (2,3) discordant besides 4 concordant pairs: (4 - 1) / sqrt(5 * 5)
    assert kendall_tau([1, 1, 2, 3], [5, 5, 7, 6]) == pytest.approx(3 / 5)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))   # constant side: undefined, as scipy
    with pytest.raises(ValueError, match="one length"):
        mae([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        kendall_tau([], [])


def test_kendall_tau_matches_scipy_with_and_without_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(2, 15)
        spread = rng.choice([3, 10, 1000])   # few distinct values: many ties
        x = [rng.randint(0, spread) for _ in range(n)]
        y = [rng.randint(0, spread) + (0.5 * xi if trial % 2 else 0.0) for xi in x]
        expected = stats.kendalltau(x, y).statistic
        if math.isnan(expected):
            assert math.isnan(kendall_tau(x, y)), (x, y)
        else:
            assert kendall_tau(x, y) == pytest.approx(expected, abs=1e-12), (x, y)


# ---------------------------------------------------------------------------------------------
# the architecture picker

def _mt_size(preset):
    qkv = PRESETS[preset].space.qkv_dim
    return lambda arch: param_count(arch, 100, qkv)


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_picker_is_deterministic_spans_the_range_and_includes_both_ends(preset):
    space = MTSpace(PRESETS[preset].space)
    size = _mt_size(preset)
    archs = pick_architectures(space, 8, size, seed=0)
    again = pick_architectures(space, 8, size, seed=0)
    assert archs == again
    assert archs[0] == space.smallest() and archs[-1] == space.largest()
    assert len({space.key(a) for a in archs}) == 8
    sizes = [size(a) for a in archs]
    assert sizes == sorted(sizes)
    drawn = [size(space.sample(random.Random(s))) for s in range(300)]
    assert sizes[0] <= min(drawn) and sizes[-1] >= max(drawn)   # the ends are the extremes
    step = (sizes[-1] - sizes[0]) / 7                           # evenly spread in between
    for j, s in enumerate(sizes):
        assert abs(s - (sizes[0] + j * step)) < 0.25 * step, (j, sizes)
    assert pick_architectures(space, 8, size, seed=1) != archs   # the seed matters


def test_picker_on_a_bert_space_and_bad_counts():
    space = get_space("supershaper", "tiny")

    def size(arch):
        return bert_param_count(space.layout(arch), 4000, 64, True)

    archs = pick_architectures(space, 5, size, seed=3)
    assert archs[0] == space.smallest() and archs[-1] == space.largest()
    assert [size(a) for a in archs] == sorted(size(a) for a in archs)
    with pytest.raises(ValueError, match=">= 2"):
        pick_architectures(space, 1, size)
    with pytest.raises(ValueError, match="fewer than"):
        pick_architectures(space, 8, size, pool=3)


# ---------------------------------------------------------------------------------------------
# standalone models from scratch

def test_param_count_formula_matches_the_modules():
    for preset in ("micro", "tiny", "full"):
        c = PRESETS[preset].space
        space = MTSpace(c)
        for seed in range(4):
            arch = space.sample(random.Random(seed))
            for shared in (True, False):
                with torch.device("meta"):
                    model = StaticTransformer(37, arch, c.qkv_dim, c.dropout, shared)
                assert sum(p.numel() for p in model.parameters()) == param_count(
                    arch, 37, c.qkv_dim, shared)


def test_from_scratch_model_is_the_sub_networks_parameterisation(tmp_path):
    c = PRESETS["tiny"].space
    arch = dict(MTSpace(c).smallest(), decoder_embed=96)
    torch.manual_seed(0)
    model = StaticTransformer.from_scratch(500, arch, c)
    table = model.embedding.weight
    assert table.shape == (500, 96) and not hasattr(model, "encoder_embedding")
    assert torch.all(table[0] == 0)                              # padding row
    assert abs(float(table[1:].detach().std()) - 96 ** -0.5) < 0.01   # N(0, 1/sqrt(width))
    assert model.embedding_weight("encoder").shape == (500, 64)  # sliced as in the supernet
    src = torch.randint(4, 500, (2, 6))
    tgt = torch.randint(4, 500, (2, 5))
    model.eval()
    spm = tmp_path / "spm.model"
    spm.write_bytes(b"")
    save_static(model, tmp_path / "export", spm, log=lambda m: None)
    loaded = load_static(tmp_path / "export")
    assert loaded.shared_embedding
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt), rtol=0, atol=0)


def test_mt_train_arch_trains_a_static_model_from_scratch(mt_data, tmp_path):
    out = tmp_path / "alone"
    mt_cli(["train", "--data", mt_data, "--out", str(out), "--preset", "micro", "--arch",
            "smallest", "--max-steps", "3", "--no-progress"])
    model, run = load_run(out)
    assert isinstance(model, StaticTransformer) and model.shared_embedding and run.step == 3
    assert model.arch == MTSpace(PRESETS["micro"].space).smallest()
    assert "valid_loss" in json.loads((out / "metrics.json").read_text())
    with pytest.raises(ValueError, match="not both"):
        MTTask(MTConfig(data=mt_data, preset="micro", arch="smallest", from_model=str(out)))


# ---------------------------------------------------------------------------------------------
# end to end, resume

def _mt_study(data, out, *extra):
    mt_cli(["study", "--data", data, "--out", str(out), "--preset", "micro", "--archs", "3",
            "--kinds", "standard,neuron", "--supernet-steps", "4", "--standalone-steps", "3",
            "--beam", "2", "--test-sentences", "8", "--router-hidden", "16", "--no-progress",
            *extra])


def test_mt_study_end_to_end_with_a_noise_seed(mt_data, tmp_path):
    out = tmp_path / "study"
    _mt_study(mt_data, out, "--seeds", "5,6", "--noise-kinds", "neuron")
    report = json.loads((out / "study.json").read_text())
    assert (out / "study.md").exists() and (out / "study.png").stat().st_size > 1000
    archs = report["archs"]
    assert len(archs) == 3 and [a["params"] for a in archs] == sorted(a["params"] for a in archs)
    space = MTSpace(PRESETS["micro"].space)
    assert archs[0]["arch"] == space.smallest() and archs[-1]["arch"] == space.largest()
    runs = {r["name"]: r for r in report["runs"]}
    assert sorted(runs) == ["standalone_0", "standalone_1", "standalone_2",
                            "supernet_neuron_seed5", "supernet_neuron_seed6",
                            "supernet_standard_seed5"]
    assert all(r["steps"] == (3 if r["kind"] == "standalone" else 4) for r in runs.values())
    assert len(report["rows"]) == 3 * 3   # (standard, neuron, neuron seed 6) x 3 archs
    for s in report["summary"]:           # the summary is computed from the rows
        rows = [r for r in report["rows"] if (r["kind"], r["seed"]) == (s["kind"], s["seed"])]
        inh = [r["inherited"][s["metric"]] for r in rows]
        std = [r["standalone"][s["metric"]] for r in rows]
        assert s["mae"] == pytest.approx(mae(inh, std))
        assert s["mean_gap"] == pytest.approx(mean_gap(inh, std))
        assert s["n"] == 3
    noise = {n["metric"]: n for n in report["noise_floor"]}
    assert set(noise) == {"bleu", "valid_loss"} and noise["bleu"]["seeds"] == [5, 6]
    seed5 = [r["inherited"]["valid_loss"] for r in report["rows"]
             if (r["kind"], r["seed"]) == ("neuron", 5)]
    seed6 = [r["inherited"]["valid_loss"] for r in report["rows"]
             if (r["kind"], r["seed"]) == ("neuron", 6)]
    assert noise["valid_loss"]["mae"] == pytest.approx(mae(seed6, seed5))
    assert noise["valid_loss"]["mae"] > 0   # another seed: other weights
    # the standalone runs trained the picked architectures, alone, from scratch
    model, run = load_run(out / "runs" / "standalone_1")
    assert isinstance(model, StaticTransformer) and model.arch == archs[1]["arch"]
    assert sum(p.numel() for p in model.parameters()) == archs[1]["params"]
    md = (out / "study.md").read_text()
    assert "## Noise floor" in md and "| neuron | 5 vs 6 |" in md
    # the settings are checked on a rerun
    with pytest.raises(ValueError, match="archs"):
        mt_cli(["study", "--data", mt_data, "--out", str(out), "--preset", "micro", "--archs",
                "4", "--kinds", "standard,neuron", "--supernet-steps", "4",
                "--standalone-steps", "3", "--beam", "2", "--test-sentences", "8",
                "--router-hidden", "16", "--seeds", "5,6", "--noise-kinds", "neuron",
                "--no-progress"])


def test_killed_study_resumes_without_retraining_and_gives_the_same_table(
        mt_data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    _mt_study(mt_data, straight)
    calls = []
    real_train = trainer.train

    def counting_train(task, cfg, log=print):
        calls.append((os.path.basename(cfg.out), cfg.resume))
        return real_train(task, cfg, log)

    monkeypatch.setattr(trainer, "train", counting_train)
    real_batch = MTTask.batch
    seen = []

    def killing_batch(self, step):   # the second run dies before its step 3 (after checkpoint 2)
        if step == 2:
            seen.append(step)
            if len(seen) == 2:
                raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(MTTask, "batch", killing_batch)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _mt_study(mt_data, killed)
    first = killed / "runs" / "supernet_standard_seed1"
    half = killed / "runs" / "supernet_neuron_seed1"
    assert (first / "metrics.json").exists() and (killed / "scores" / f"{first.name}.json").exists()
    assert not (half / "metrics.json").exists() and (half / "checkpoint_2.pt").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    score_stamp = (killed / "scores" / f"{first.name}.json").stat().st_mtime_ns
    calls.clear()
    _mt_study(mt_data, killed)
    assert calls == [("supernet_neuron_seed1", True), ("standalone_0", False),
                     ("standalone_1", False), ("standalone_2", False)]
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps   # not retrained
    assert (killed / "scores" / f"{first.name}.json").stat().st_mtime_ns == score_stamp
    a = json.loads((straight / "study.json").read_text())
    b = json.loads((killed / "study.json").read_text())
    assert a["rows"] == b["rows"] and a["summary"] == b["summary"]   # same table, bit for bit
    calls.clear()
    _mt_study(mt_data, killed)   # a finished study: nothing trained or scored again
    assert calls == []


@pytest.fixture(scope="module")
def bert_data(tmp_path_factory):
    """The cleaned docstrings of the stdlib's email and json packages (as tests/test_bert.py)."""
    import email
    import json as json_pkg
    docs = []
    for pkg in (email, json_pkg):
        docs += bdata.stdlib_documents(os.path.dirname(pkg.__file__))
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n".join(text for _, text in docs) + "\n")
    out = tmp_path_factory.mktemp("bert_data")
    bdata.prepare(str(out), [str(path)], vocab_size=300, valid_percent=20)
    return str(out)


def test_bert_study_end_to_end(bert_data, tmp_path):
    out = tmp_path / "study"
    bert_cli(["study", "--data", bert_data, "--out", str(out), "--archs", "3", "--kinds",
              "layer,neuron", "--supernet-steps", "3", "--standalone-steps", "2", "--batch-size",
              "4", "--seq-len", "32", "--router-hidden", "16", "--valid-blocks", "8",
              "--device", "cpu", "--no-progress"])
    report = json.loads((out / "study.json").read_text())
    assert len(report["rows"]) == 2 * 3 and (out / "study.png").exists()
    for row in report["rows"]:
        for side in ("inherited", "standalone"):
            scores = row[side]
            assert scores["perplexity"] == pytest.approx(math.exp(scores["valid_loss"]))
    from mos_models.bert.model import BertMLM, BertSupernet
    from mos_models.bert.train import load_run as bert_load_run
    model, run = bert_load_run(str(out / "runs" / "standalone_2"))
    assert isinstance(model, BertMLM) and not isinstance(model, BertSupernet)
    assert run.task_config.arch == report["archs"][2]["arch"]
    assert sum(p.numel() for p in model.parameters()) == report["archs"][2]["params"]
    assert "valid perplexity MAE" in (out / "study.md").read_text()
