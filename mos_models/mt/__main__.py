"""Command line: python -m mos_models.mt data|train|translate|search|export ...

    data      --lang LANG --out DIR
    train     --data DIR --out RUN --preset tiny [--supernet neuron|layer|standard]
              [--sampling sandwich|spos] [--max-minutes N] [--resume] [--from-model DIR]
              [--amp off|bf16|fp16]
    translate (--run RUN --arch largest|smallest|ARCH.json | --model DIR --data DIR)
              --split test --json OUT.json
    search    --run RUN --latency-ms X [Y ...] --json OUT.json
    export    --run RUN --arch largest|smallest|ARCH.json --out DIR

Several processes: torchrun --nproc_per_node=N -m mos_models.mt train ...
"""
import argparse
import json
import sys
from pathlib import Path

import torch


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_data(a) -> None:
    from .data import build_corpus
    build_corpus(a.out, a.lang, a.locale_dir, a.valid_fraction, a.test_fraction, a.max_chars,
                 a.vocab_size, log=_log)


def cmd_train(a) -> None:
    from .train import TrainArgs, train
    args = TrainArgs(data=a.data, out=a.out, preset=a.preset, supernet=a.supernet,
                     sampling=a.sampling, max_minutes=a.max_minutes, max_steps=a.max_steps,
                     max_tokens=a.max_tokens, lr=a.lr, warmup_steps=a.warmup_steps, seed=a.seed,
                     resume=a.resume, backend=a.backend,
                     save_mixed_weight=a.save_mixed_weight, device=a.device, amp=a.amp,
                     save_every=a.save_every, from_model=a.from_model,
                     progress=not a.no_progress)
    train(args, log=_log)


def cmd_translate(a) -> None:
    from .config import describe, resolve_arch
    from .data import Tokenizer, detect_lang, load_split
    from .translate import evaluate_bleu
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    arch = None
    if a.run:
        from .train import load_run
        model, run = load_run(a.run, device)
        data = a.data or run["data"]
        tokenizer = Tokenizer(Path(a.run) / "spm.model")
        if hasattr(model, "space"):
            arch = resolve_arch(model.space, a.arch)
            model.set_arch(arch)
        else:
            arch = model.arch
    else:
        if not a.data:
            raise SystemExit("translate: --model needs --data")
        from .export import load_static
        model = load_static(a.model, device)
        data, arch = a.data, model.arch
        tokenizer = Tokenizer(Path(a.model) / "spm.model")
    model.to(device).eval()
    src, _, refs = load_split(data, a.split, tokenizer, detect_lang(data))
    result = evaluate_bleu(model, tokenizer, src, refs, a.beam, a.lenpen, device, a.limit)
    hypotheses = result.pop("hypotheses")
    result.update(split=a.split, arch=arch, description=describe(arch), data=str(data))
    if a.output:
        Path(a.output).write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    _log(f"{a.split}: {result['bleu_text']} ({result['sentences']} sentences, "
         f"{result['seconds']:.1f}s) -> {a.json}")


def cmd_search(a) -> None:
    from ..common.evolution import EvolutionConfig
    from .search import run_search
    config = EvolutionConfig(iterations=a.iterations, population=a.population,
                             parents=a.parents, mutations=a.mutations,
                             mutation_prob=a.mutation_prob, crossovers=a.crossovers,
                             seed=a.seed)
    timing = {"warmup": a.warmup, "runs": a.runs, "src_len": a.src_len, "tgt_len": a.tgt_len}
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_search(a.run, a.latency_ms, a.json, a.latency_samples, a.valid_sentences, config,
               device, timing, log=_log)


def cmd_export(a) -> None:
    from .export import export_run
    export_run(a.run, a.arch, a.out, log=_log)


def parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    p = argparse.ArgumentParser(prog="python -m mos_models.mt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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

    t = sub.add_parser("train", help="train a supernet (or a static model further)")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    t.add_argument("--supernet", default="neuron", choices=["neuron", "layer", "standard"])
    t.add_argument("--sampling", default="sandwich", choices=["sandwich", "spos"])
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--max-tokens", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--backend", default="auto",
                   choices=["auto", "reference", "cpu", "triton", "cuda"])
    t.add_argument("--save-mixed-weight", action="store_true",
                   help="MoS layers keep W_a from the forward for the backward: one combine "
                        "less per layer and step, n_out x n_in more memory per layer")
    t.add_argument("--device", default=None)
    t.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                   help="mixed precision: autocast forward passes (fp16 adds loss scaling)")
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--from-model", default=None,
                   help="an exported model directory to train further on its own")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("translate", help="beam search and BLEU")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--run")
    src.add_argument("--model")
    r.add_argument("--arch", default="largest")
    r.add_argument("--data", default=None)
    r.add_argument("--split", default="test")
    r.add_argument("--json", required=True)
    r.add_argument("--output", default=None, help="also write the translations here")
    r.add_argument("--beam", type=int, default=4)
    r.add_argument("--lenpen", type=float, default=0.6)
    r.add_argument("--limit", type=int, default=None, help="first N sentences only")
    r.add_argument("--device", default=None)
    r.set_defaults(func=cmd_translate)

    s = sub.add_parser("search", help="latency-constrained evolutionary search")
    s.add_argument("--run", required=True)
    s.add_argument("--latency-ms", type=float, nargs="+", required=True)
    s.add_argument("--json", required=True)
    s.add_argument("--latency-samples", type=int, default=100)
    s.add_argument("--valid-sentences", type=int, default=300)
    s.add_argument("--iterations", type=int, default=30)
    s.add_argument("--population", type=int, default=125)
    s.add_argument("--parents", type=int, default=25)
    s.add_argument("--mutations", type=int, default=50)
    s.add_argument("--mutation-prob", type=float, default=0.3)
    s.add_argument("--crossovers", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--runs", type=int, default=10)
    s.add_argument("--src-len", type=int, default=30)
    s.add_argument("--tgt-len", type=int, default=30)
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_search)

    e = sub.add_parser("export", help="export an architecture as a static Transformer")
    e.add_argument("--run", required=True)
    e.add_argument("--arch", default="largest")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
