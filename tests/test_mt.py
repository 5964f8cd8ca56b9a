"""Fast tests of the MT supernet (mos_models.mt): data, model, export, training, search, CLI."""
import json
import os
import random
import shutil
import socket
import struct

import pytest
import torch

from mos_kernels import MoSLinear
from mos_models.common import arch_rng, load_checkpoint, sample_archs, sandwich_step
from mos_models.mt import PRESETS, MTSupernet, StaticTransformer
from mos_models.mt.__main__ import main as cli
from mos_models.mt.data import (BOS, EOS, PAD, Tokenizer, build_corpus, clean_pair, collate,
                                epoch_batches, load_split, make_batches, read_lines, read_mo)
from mos_models.mt.export import load_static
from mos_models.mt.model import loss_fn
from mos_models.common import TrainConfig
from mos_models.mt.train import MTConfig, load_run, train
from mos_models.mt.translate import beam_search

MICRO = PRESETS["micro"].space
VOCAB = 50


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one thread is fastest and immune to busy machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# a fake gettext catalog

def write_mo(path, entries, charset="UTF-8"):
    """A GNU .mo file (little endian) of (msgid, msgstr) byte strings, with a header entry."""
    header = (f"Content-Type: text/plain; charset={charset}\n"
              "Plural-Forms: nplurals=2; plural=(n != 1);\n").encode("ascii")
    items = sorted([(b"", header)] + [(k, v) for k, v in entries])
    n = len(items)
    orig_at, trans_at = 28, 28 + 8 * n
    data_at = trans_at + 8 * n
    blob, orig, trans = b"", [], []
    for key, _ in items:
        orig.append((len(key), data_at + len(blob)))
        blob += key + b"\0"
    for _, value in items:
        trans.append((len(value), data_at + len(blob)))
        blob += value + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, orig_at, trans_at, 0, 0)
    out += b"".join(struct.pack("<2I", *t) for t in orig + trans) + blob
    path.write_bytes(out)


WORDS = [("file", "Datei"), ("folder", "Ordner"), ("user", "Benutzer"), ("key", "Schlüssel"),
         ("table", "Tabelle"), ("option", "Option"), ("value", "Wert"), ("branch", "Zweig")]


def fake_locale(root):
    """Two catalogs for 'xx': 160 clean pairs plus every kind of entry the cleaner drops."""
    folder = root / "xx" / "LC_MESSAGES"
    folder.mkdir(parents=True)
    good = []
    for i, (en, de) in enumerate(WORDS):
        for j, (en2, de2) in enumerate(WORDS):
            for verb, verb_de in (("cannot open", "kann nicht öffnen"),
                                  ("invalid", "ungültig")):
                good.append((f"{verb} {en} of the {en2} %s".encode(),
                             f"{de} des {de2} %s {verb_de}".encode()))
    tricky = [
        (b"Usage:   %s  [OPTION]...\n", b"Aufruf:   %s  [OPTION]...\n"),  # normalised, kept
        (b"untranslated message", b""),                                  # empty
        (b"Options", b"Options"),                                        # copy
        (b"PostgreSQL", b"postgresql"),                                  # copy up to case
        (b"first line\nsecond line", b"erste Zeile\nzweite Zeile"),      # multi-line
        (b"menu\x04Open", b"\xc3\x96ffnen"),                             # context: kept
        (b"%d file\x00%d files", b"%d Datei\x00%d Dateien"),             # plural: singular
        (b"%s: %s", b"%s: %s"),                                          # no words
    ]
    write_mo(folder / "one.mo", good[:100] + tricky)
    write_mo(folder / "two.mo", good[100:] + good[:10])  # 10 duplicates
    latin = [("Ä is a letter".encode("latin-1"), "Ä ist ein Buchstabe".encode("latin-1"))]
    write_mo(folder / "three.mo", latin, charset="ISO-8859-1")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = fake_locale(tmp_path_factory.mktemp("locale"))
    out = tmp_path_factory.mktemp("data")
    stats = build_corpus(out, "xx", root, valid_fraction=0.15, test_fraction=0.15,
                         vocab_size=VOCAB, log=lambda msg: None)
    return out, stats, root


def test_read_mo_parses_context_plural_and_charset(tmp_path):
    root = fake_locale(tmp_path)
    entries = read_mo(root / "xx/LC_MESSAGES/one.mo")
    by_id = {e.msgid: e for e in entries}
    assert by_id["Open"].context == "menu" and by_id["Open"].msgstrs == ["Öffnen"]
    assert by_id["%d file"].msgid_plural == "%d files"
    assert by_id["%d file"].msgstrs == ["%d Datei", "%d Dateien"]
    assert "" not in by_id  # header skipped
    latin = read_mo(root / "xx/LC_MESSAGES/three.mo")
    assert latin[0].msgid == "Ä is a letter" and latin[0].msgstrs == ["Ä ist ein Buchstabe"]
    with pytest.raises(ValueError, match="not a .mo"):
        (tmp_path / "bad.mo").write_bytes(b"\0" * 40)
        read_mo(tmp_path / "bad.mo")


def test_clean_pair_rules():
    assert clean_pair("  a\tb  c ", "x  y z") == (("a b c", "x y z"), "ok")
    assert clean_pair("Hello %s", "") == (None, "empty")
    assert clean_pair("Line one\nLine two", "Zeile\nZwei")[1] == "multi-line"
    assert clean_pair("Options", "options")[1] == "copy"
    assert clean_pair("Connection refused", "Connection refused.")[1] == "copy"
    assert clean_pair("--%s=%d", "--%s=%d")[1] == "no words"
    assert clean_pair("x" * 301, "y" * 301, max_chars=300)[1] == "too long"
    assert clean_pair("Print {0} and %1$s", "Drucke {0} und %1$s")[0] == (
        "Print {0} and %1$s", "Drucke {0} und %1$s")  # placeholders kept as they are


def test_data_builder_on_a_fake_catalog(corpus, tmp_path):
    out, stats, root = corpus
    assert stats["entries"] == 108 + 38 + 1 and stats["pairs"] == 128 + 4
    assert stats["duplicate"] == 10 and stats["empty"] == 1 and stats["multi-line"] == 1
    assert stats["copy"] == 2 and stats["no words"] == 1
    sources = {split: read_lines(out / f"{split}.en") for split in ("train", "valid", "test")}
    targets = {split: read_lines(out / f"{split}.xx") for split in sources}
    assert all(len(sources[s]) == len(targets[s]) > 0 for s in sources)
    folded = {s: {x.casefold() for x in v} for s, v in sources.items()}
    assert not folded["train"] & folded["valid"] and not folded["train"] & folded["test"]
    assert not folded["valid"] & folded["test"]
    everything = [p for s in sources for p in zip(sources[s], targets[s])]
    assert len(everything) == len(set(everything)) == stats["pairs"]
    assert ("Usage: %s [OPTION]...", "Aufruf: %s [OPTION]...") in everything
    assert ("Open", "Öffnen") in everything and ("%d file", "%d Datei") in everything
    assert (out / "spm.model").exists() and "copy_bleu_test" in stats
    again = tmp_path / "again"
    build_corpus(again, "xx", root, valid_fraction=0.15, test_fraction=0.15, vocab_size=VOCAB,
                 log=lambda msg: None)
    for name in ("train.en", "valid.xx", "test.en"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    with pytest.raises(FileNotFoundError, match="installed languages: xx"):
        build_corpus(tmp_path / "none", "yy", root, log=lambda msg: None)


def test_token_batching(corpus):
    out, _, _ = corpus
    tok = Tokenizer(out / "spm.model")
    src, tgt, refs = load_split(out, "train", tok)
    assert all(s[-1] == EOS and t[-1] == EOS for s, t in zip(src, tgt))
    batches = make_batches(src, tgt, 200)
    assert sorted(i for b in batches for i in b) == list(range(len(src)))
    for b in batches:
        longest = max(len(src[i]) + len(tgt[i]) for i in b)
        assert len(b) == 1 or longest * len(b) <= 200
    assert epoch_batches(batches, 1, 3) == epoch_batches(batches, 1, 3)
    assert epoch_batches(batches, 1, 3) != epoch_batches(batches, 1, 4)
    halves = [epoch_batches(batches, 1, 0, r, 2) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(batches) // 2
    s, t_in, t_out = collate(batches[0], src, tgt)
    assert (t_in[:, 0] == BOS).all() and t_in.shape == t_out.shape
    assert (t_in[:, 1:][t_out[:, 1:] != PAD] == t_out[:, :-1][t_out[:, 1:] != PAD]).all()


# ---------------------------------------------------------------------------------------------
# model

def _batch(seed=0, batch=3, s_len=7, t_len=5):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (batch, s_len), generator=gen)
    tgt = torch.randint(4, VOCAB, (batch, t_len), generator=gen)
    src[0, -2:] = PAD  # padding must be ignored
    return src, tgt


@pytest.mark.parametrize("kind", ["neuron", "layer", "standard"])
def test_shapes_and_architecture_switching(kind):
    torch.manual_seed(0)
    model = MTSupernet(VOCAB, MICRO, kind).eval()  # no dropout
    src, tgt = _batch()
    space = model.space
    assert space.encode(space.largest()) == [1.0] * 10
    assert all(0 < v <= 1 for v in space.encode(space.smallest()))
    outputs = []
    for arch in (space.largest(), space.smallest(), space.sample(random.Random(3))):
        model.set_arch(arch)
        logits = model(src, tgt)
        assert logits.shape == (3, 5, VOCAB)
        outputs.append(logits)
    assert not torch.allclose(outputs[0], outputs[1])
    model.set_arch(space.largest())
    torch.testing.assert_close(model(src, tgt), outputs[0])  # switching back is exact
    with pytest.raises(ValueError, match="not one of"):
        model.set_arch(dict(space.largest(), encoder_embed=20))
    ffn = model.encoder_layers[0].ffn.fc1
    assert (ffn.mos is None) == (kind == "standard")


@pytest.mark.parametrize("kind", ["neuron", "layer", "standard"])
def test_export_equals_the_supernet_and_trains_alone(kind, tmp_path):
    torch.manual_seed(1)
    model = MTSupernet(VOCAB, MICRO, kind)
    src, tgt = _batch(1)
    for arch in (model.space.smallest(), model.space.sample(random.Random(5))):
        static = model.export(arch)
        model.train(False)
        static.train(False)
        expected = model.set_arch(arch)(src, tgt)  # grad enabled: the op path, not the cache
        torch.testing.assert_close(static(src, tgt), expected, rtol=1e-5, atol=1e-5)
    names = " ".join(static.state_dict())
    assert "experts" not in names and "router" not in names
    assert all(type(m).__module__.startswith(("torch.", "mos_models.mt.model"))
               for m in static.modules())
    from mos_models.mt.export import save_static
    save_static(static, tmp_path / "exported", _spm(tmp_path), log=lambda msg: None)
    loaded = load_static(tmp_path / "exported")
    assert isinstance(loaded, StaticTransformer)
    torch.testing.assert_close(loaded(src, tgt), expected, rtol=1e-5, atol=1e-5)
    loaded.train()
    opt = torch.optim.Adam(loaded.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(loaded(src, tgt), tgt)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first


def _spm(tmp_path):
    """A throwaway sentencepiece model (export copies one)."""
    path = tmp_path / "spm.model"
    path.write_bytes(b"not a real model")
    return path


def test_incremental_decoding_and_beam_search():
    torch.manual_seed(2)
    model = MTSupernet(VOCAB, MICRO, "neuron").eval()
    model.set_arch(model.space.sample(random.Random(1)))
    src, tgt = _batch(2)
    with torch.no_grad():
        full = model(src, tgt)
        enc = model.encode(src)
        cache = []
        steps = [model.decode(tgt[:, t:t + 1], enc, cache, start=t) for t in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)

    hyps = beam_search(model, src, beam=1, max_len_b=6)
    with torch.no_grad():  # greedy decoding without any cache must agree with beam 1
        for row in range(src.shape[0]):
            tokens = [BOS]
            while len(tokens) < len(hyps[row]) + 1:
                logits = model(src[row:row + 1], torch.tensor([tokens]))[0, -1]
                logits[[PAD, BOS]] = -float("inf")
                tokens.append(int(logits.argmax()))
            assert tokens[1:] == hyps[row]
    beams = beam_search(model, src, beam=4)
    assert len(beams) == 3 and all(EOS not in h and BOS not in h for h in beams)


def test_beam_search_collapses_mos_weights_once_per_architecture(monkeypatch):
    torch.manual_seed(3)
    model = MTSupernet(VOCAB, MICRO, "neuron")
    calls = []
    original = MoSLinear.collapsed_weights
    monkeypatch.setattr(MoSLinear, "collapsed_weights",
                        lambda self: calls.append(id(self)) or original(self))
    arch = model.space.smallest()
    model.set_arch(arch)
    src, _ = _batch(3)
    beam_search(model, src, beam=4, max_len_b=8)
    active = 2 * (arch["encoder_layers"] + arch["decoder_layers"])
    assert len(calls) == len(set(calls)) == active  # once per active FFN linear, not per step
    beam_search(model, src, beam=4, max_len_b=8)
    assert len(calls) == active  # same architecture: still cached
    model.set_arch(model.space.largest())
    beam_search(model, src, beam=2, max_len_b=3)
    assert len(calls) == active + 2 * (2 + 2)


def test_one_sandwich_step_trains_every_part():
    torch.manual_seed(4)
    model = MTSupernet(VOCAB, MICRO, "neuron")
    src, tgt = _batch(4)
    t_in = torch.cat([torch.full((3, 1), BOS), tgt[:, :-1]], 1)
    archs = sample_archs(model.space, arch_rng(0, 0))
    losses = sandwich_step(model, archs, lambda m, a: loss_fn(m(src, t_in), tgt, 0.1))
    assert len(losses) == 3 and all(l > 0 for l in losses)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    router = model.decoder_layers[1].ffn.fc2.mos.router[2].weight  # layer 2: largest only
    assert router.grad.abs().sum() > 0
    assert model.encoder_layers[0].ffn.fc1.mos.experts.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# training, resume, DDP, search, CLI

def _train(data, out, task=None, log=lambda m: None, **kw):
    """MT training on the micro preset: ``task`` overrides MTConfig, ``kw`` TrainConfig."""
    base = dict(out=str(out), max_steps=4, save_every=2, progress=False, seed=3)
    base.update(kw)
    return train(MTConfig(data=str(data), preset="micro", **(task or {})), TrainConfig(**base),
                 log=log)


@pytest.mark.parametrize("amp", ["off", "fp16"])  # fp16: the loss scaler's state resumes too
def test_resume_continues_exactly_where_a_killed_run_stopped(corpus, tmp_path, amp):
    data = corpus[0]
    straight = tmp_path / "straight"
    _train(data, straight, amp=amp)
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("config.json", "spm.model", "checkpoint_2.pt"):
        shutil.copy(straight / name, killed / name)  # as if killed right after step 2
    # and the next checkpoint was cut short (a full disk): --resume says so, takes step 2's
    (killed / "checkpoint_3.pt").write_bytes((straight / "checkpoint_4.pt").read_bytes()[:999])
    with pytest.raises(FileExistsError, match="--resume"):
        _train(data, killed, amp=amp)
    logged = []
    result = _train(data, killed, resume=True, amp=amp, log=logged.append)
    assert result["step"] == 4
    assert any("skipping checkpoint_3.pt" in m and "not a complete checkpoint" in m
               for m in logged), logged
    assert any("resumed from" in m and "checkpoint_2.pt at step 2" in m for m in logged), logged
    assert sorted(p.name for p in killed.glob("checkpoint_*")) == [
        "checkpoint_2.pt", "checkpoint_3.pt.unreadable", "checkpoint_4.pt"]
    a = load_checkpoint(straight / "checkpoint_4.pt")
    b = load_checkpoint(killed / "checkpoint_4.pt")
    assert a["step"] == b["step"] == 4
    assert a["extra"]["scaler"] == b["extra"]["scaler"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(s1["exp_avg_sq"], s2["exp_avg_sq"], rtol=0, atol=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_train(rank, port, data, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mos_models.common import cleanup_distributed
    result = _train(data, out, {"max_tokens": 128}, max_steps=2, save_every=100)
    torch.save({n: p.detach().clone() for n, p in result["model"].named_parameters()},
               os.path.join(out, f"rank{rank}.pt"))
    cleanup_distributed()


def test_two_process_ddp_training_step(corpus, tmp_path):
    out = tmp_path / "ddp"
    torch.multiprocessing.start_processes(_ddp_train, args=(_free_port(), str(corpus[0]),
                                                            str(out)), nprocs=2,
                                          start_method="fork")
    state = load_checkpoint(out / "checkpoint_2.pt")
    assert state["step"] == 2 and json.loads((out / "config.json").read_text())["world_size"] == 2
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    torch.manual_seed(3)  # the training seed: the same initial weights
    init = dict(MTSupernet(ranks[0]["embedding.weight"].shape[0], MICRO, "neuron")
                .named_parameters())
    moved = [n for n, p in ranks[0].items() if not torch.equal(p, init[n])]
    for name, p in ranks[0].items():  # DDP kept the replicas identical
        torch.testing.assert_close(p, ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(p, state["model"][name], rtol=0, atol=0)
    assert moved  # the step changed the weights


def test_cli_translate_export_and_search(corpus, tmp_path):
    data = corpus[0]
    run = tmp_path / "run"
    cli(["train", "--data", str(data), "--out", str(run), "--preset", "micro",
         "--supernet", "layer", "--max-steps", "2", "--no-progress", "--save-mixed-weight"])
    out = tmp_path / "bleu.json"
    cli(["translate", "--run", str(run), "--arch", "smallest", "--split", "test",
         "--json", str(out), "--beam", "2"])
    result = json.loads(out.read_text())
    assert 0 <= result["bleu"] <= 100 and result["sentences"] == len(
        read_lines(data / "test.en"))
    cli(["export", "--run", str(run), "--arch", "largest", "--out", str(tmp_path / "model")])
    out2 = tmp_path / "bleu2.json"
    cli(["translate", "--model", str(tmp_path / "model"), "--data", str(data),
         "--json", str(out2), "--beam", "2"])
    assert json.loads(out2.read_text())["arch"]["decoder_layers"] == 2
    exported = json.loads((tmp_path / "model" / "config.json").read_text())
    assert exported["format"] == "mos-export/1" and exported["source"]["step"] == 2
    assert (tmp_path / "model" / "model.safetensors").exists()
    more = tmp_path / "more"  # the exported model, trained further on its own
    cli(["train", "--data", str(data), "--out", str(more), "--from-model",
         str(tmp_path / "model"), "--max-steps", "2", "--no-progress"])
    static, run_more = load_run(more)
    assert isinstance(static, StaticTransformer) and run_more.step == 2
    assert "valid_loss" in json.loads((more / "metrics.json").read_text())
    search_json = tmp_path / "search.json"
    cli(["search", "--run", str(run), "--latency-ms", "1000", "0.000001", "--json",
         str(search_json), "--latency-samples", "6", "--runs", "2", "--warmup", "1",
         "--src-len", "5", "--tgt-len", "3", "--iterations", "2", "--population", "6",
         "--parents", "2", "--mutations", "2", "--crossovers", "2", "--valid-sentences", "8"])
    report = json.loads(search_json.read_text())
    found, infeasible = report["results"]
    assert found["arch"] is not None and found["predicted_latency_ms"] <= 1000
    assert infeasible["arch"] is None and "constraint" in infeasible["error"]
    assert report["architectures_evaluated"] > 0 and "mae_ms" in report["predictor_error"]
    arch_file = tmp_path / "search.arch_1000ms.json"
    cli(["export", "--run", str(run), "--arch", str(arch_file), "--out", str(tmp_path / "m2")])
    assert load_static(tmp_path / "m2").arch == json.loads(arch_file.read_text())["arch"]


def test_compile_trains_the_micro_preset_with_a_bounded_graph_count(corpus, tmp_path):
    """--compile compiles attention and FFN blocks (MTSupernet.compile_units), one graph per
    block size, however many architectures the sandwich draws. Backend "eager": dynamo's graph
    capture and guards (what decides the count) without code generation, which takes minutes."""
    result = _train(corpus[0], tmp_path / "compiled", max_steps=2, compile=True,
                    compile_backend="eager")
    eager = _train(corpus[0], tmp_path / "eager", max_steps=2)
    assert result["step"] == 2
    for key in ("valid_loss_largest", "valid_loss_smallest"):
        assert result[key] == pytest.approx(eager[key], rel=1e-4)
    c = MICRO
    embeds, heads = len(c.embed_choices), len(c.head_choices)
    ffn_sizes = embeds * len(c.ffn_choices)
    attention_sizes = 2 * embeds * heads + embeds * embeds * heads  # self (enc, dec), cross
    assert 0 < result["compiled_graphs"] <= ffn_sizes + attention_sizes
