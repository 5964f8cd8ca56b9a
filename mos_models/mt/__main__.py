"""Command line: python -m mos_models.mt (or mos-mt) data|train|translate|search|export|study

    data      --lang LANG --out DIR
    train     --data DIR --out RUN --preset tiny [--supernet neuron|layer|standard]
              [--sampling sandwich|spos] [--max-minutes N] [--resume]
              [--from-model DIR | --arch ARCH]
              [--amp off|bf16|fp16] [--compile] [--backend B] [--strategy S]
    translate (--run RUN --arch largest|smallest|ARCH.json | --model DIR --data DIR)
              --split test --json OUT.json
    search    --run RUN --latency-ms X [Y ...] --json OUT.json
    export    --run RUN --arch largest|smallest|ARCH.json --out DIR
    study     --data DIR --out DIR [--archs K] [--supernet-minutes M] [--standalone-minutes S]
              [--kinds standard,layer,neuron] [--sampling sandwich|spos] [--seeds 1,2]
              [--noise-kinds neuron] [--test-sentences N]   (resumes when run again)

Several processes: torchrun --nproc_per_node=N -m mos_models.mt train ...
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from ..common import cli


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_data(a) -> None:
    from .data import build_corpus
    build_corpus(a.out, a.lang, a.locale_dir, a.valid_fraction, a.test_fraction, a.max_chars,
                 a.vocab_size, log=_log)


def cmd_train(a) -> None:
    from .train import MTConfig, train
    config = MTConfig(data=a.data, preset=a.preset, supernet=a.supernet,
                      max_tokens=a.max_tokens, num_experts=a.num_experts,
                      router_hidden=a.router_hidden, from_model=a.from_model, arch=a.arch)
    train(config, cli.train_config(a), log=_log)


def _translation_model(a, device):
    """(model, data directory, tokenizer) of ``translate``'s --run/--arch or --model/--data."""
    from .data import Tokenizer
    if a.run:
        from .train import load_run
        model, run = load_run(a.run, device, log=_log)
        if hasattr(model, "space"):
            model.set_arch(model.space.parse(a.arch))
        return model, a.data or run.task_config.data, Tokenizer(Path(a.run) / "spm.model")
    if not a.data:
        raise SystemExit("translate: --model needs --data")
    from .export import load_static
    return load_static(a.model, device), a.data, Tokenizer(Path(a.model) / "spm.model")


def cmd_translate(a) -> None:
    from .config import describe
    from .data import detect_lang, load_split
    from .translate import evaluate_bleu
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, data, tokenizer = _translation_model(a, device)
    model.to(device).eval()
    src, _, refs = load_split(data, a.split, tokenizer, detect_lang(data))
    result = evaluate_bleu(model, tokenizer, src, refs, a.beam, a.lenpen, device, a.limit)
    hypotheses = result.pop("hypotheses")
    result.update(split=a.split, arch=model.arch, description=describe(model.arch),
                  data=str(data))
    if a.output:
        Path(a.output).write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    _log(f"{a.split}: {result['bleu_text']} ({result['sentences']} sentences, "
         f"{result['seconds']:.1f}s) -> {a.json}")


def cmd_search(a) -> None:
    from .search import run_search
    timing = {"warmup": a.warmup, "runs": a.runs, "src_len": a.src_len, "tgt_len": a.tgt_len}
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_search(a.run, a.latency_ms, a.json, a.latency_samples, a.valid_sentences,
               cli.evolution_config(a), device, timing, log=_log)


def cmd_export(a) -> None:
    from .train import export_run
    export_run(a.run, a.arch, a.out, log=_log)


def cmd_study(a) -> None:
    from ..common.study import Study
    from .study import MTStudy
    family = MTStudy(a.data, a.preset, a.max_tokens, a.num_experts, a.router_hidden,
                     a.test_sentences, a.beam, a.lenpen)
    Study(family, cli.study_config(a), a.out, cli.runtime_config(a), log=_log).run()


def _train_parser(sub) -> None:
    from .config import PRESETS
    t = sub.add_parser("train", help="train a supernet (or a static model further)")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    t.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per batch and process (default: the preset's)")
    t.add_argument("--from-model", default=None,
                   help="an exported model directory to train further on its own")
    t.add_argument("--arch", default=None,
                   help="train this architecture of the space alone, from scratch (a static "
                        "model): largest | smallest | ARCH.json | inline JSON")
    cli.add_train_flags(t, seed=1)
    t.set_defaults(func=cmd_train, save_every=200)


def _translate_parser(sub) -> None:
    r = sub.add_parser("translate", help="beam search and BLEU")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--run")
    src.add_argument("--model")
    r.add_argument("--arch", default="largest",
                   help="largest | smallest | ARCH.json | inline JSON (with --run)")
    r.add_argument("--data", default=None)
    r.add_argument("--split", default="test")
    r.add_argument("--json", required=True)
    r.add_argument("--output", default=None, help="also write the translations here")
    r.add_argument("--beam", type=int, default=4)
    r.add_argument("--lenpen", type=float, default=0.6)
    r.add_argument("--limit", type=int, default=None, help="first N sentences only")
    r.add_argument("--device", default=None)
    r.set_defaults(func=cmd_translate)


def _search_parser(sub) -> None:
    s = sub.add_parser("search", help="latency-constrained evolutionary search")
    s.add_argument("--run", required=True)
    s.add_argument("--latency-ms", type=float, nargs="+", required=True)
    s.add_argument("--json", required=True)
    s.add_argument("--latency-samples", type=int, default=100)
    s.add_argument("--valid-sentences", type=int, default=300)
    cli.add_evolution_flags(s)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--runs", type=int, default=10)
    s.add_argument("--src-len", type=int, default=30)
    s.add_argument("--tgt-len", type=int, default=30)
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_search)


def _study_parser(sub) -> None:
    from .config import PRESETS
    s = sub.add_parser("study", help="supernet-quality study: inherited against standalone "
                       "scores of K architectures for each supernet kind")
    s.add_argument("--data", required=True)
    s.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    s.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per training batch (default: the preset's)")
    s.add_argument("--test-sentences", type=int, default=None,
                   help="BLEU on the first N test sentences (default: all)")
    s.add_argument("--beam", type=int, default=4)
    s.add_argument("--lenpen", type=float, default=0.6)
    cli.add_study_flags(s, seed=1)
    cli.add_runtime_flags(s)
    s.set_defaults(func=cmd_study)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mos_models.mt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_threads_flag(p, top_level=True)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="build a parallel corpus from gettext catalogs")
    d.add_argument("--lang", default="de")
    d.add_argument("--out", required=True)
    d.add_argument("--locale-dir", default="/usr/share/locale")
    d.add_argument("--valid-fraction", type=float, default=0.03)
    d.add_argument("--test-fraction", type=float, default=0.03)
    d.add_argument("--max-chars", type=int, default=300)
    d.add_argument("--vocab-size", type=int, default=8000)
    d.set_defaults(func=cmd_data)
    _train_parser(sub)
    _translate_parser(sub)
    _search_parser(sub)
    _study_parser(sub)
    e = sub.add_parser("export", help="export an architecture as a static Transformer")
    e.add_argument("--run", required=True)
    e.add_argument("--arch", default="largest",
                   help="largest | smallest | ARCH.json | inline JSON")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    cli.apply_threads(args)
    args.func(args)


if __name__ == "__main__":
    main()
