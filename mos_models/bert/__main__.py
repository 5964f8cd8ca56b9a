"""Command line: python -m mos_models.bert (or mos-bert) data|train|evaluate|search|export|study
(see README.md). Several processes: torchrun --nproc_per_node=N -m mos_models.bert train ..."""
import argparse
import json
import os
import sys

from ..common import cli


def _write_json(path: str, obj) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(json.dumps(obj))


def cmd_data(args):
    from .data import prepare
    meta = prepare(args.out, args.text, vocab_size=args.vocab_size,
                   valid_percent=args.valid_percent)
    print(json.dumps(meta))


def cmd_train(args):
    from .train import BertConfig, train
    config = BertConfig(data=args.data, preset=args.preset, space=args.space,
                        supernet=args.supernet, num_experts=args.num_experts,
                        router_hidden=args.router_hidden,
                        pre_norm={"pre": True, "post": False}[args.norm],
                        seq_len=args.seq_len, batch_size=args.batch_size, dropout=args.dropout,
                        arch=args.arch)
    train(config, cli.train_config(args))


def _evaluated_model(args):
    """(model, data directory, seq_len, vocab size, extra output) of evaluate's arguments."""
    if (args.run is None) == (args.model is None):
        sys.exit("evaluate: give either --run RUN --arch ARCH or --model DIR --data DIR")
    if args.run is not None:
        from .train import load_run
        model, run = load_run(args.run, args.device)
        cfg = run.task_config
        if hasattr(model, "space"):   # a supernet (a run of one static model needs no --arch)
            if args.arch is None:
                sys.exit("evaluate: --run needs --arch largest|smallest|ARCH.json")
            model.set_arch(model.space.parse(args.arch))
            extra = {"arch": model.arch, "params": model.param_count()}
        else:
            extra = {"arch": cfg.arch, "params": sum(p.numel() for p in model.parameters())}
        return model, args.data or cfg.data, cfg.seq_len, cfg.vocab_size, extra
    from .export import load_exported
    if args.data is None:
        sys.exit("evaluate: --model needs --data DIR")
    model, config = load_exported(args.model, args.device)
    extra = {"params": sum(p.numel() for p in model.parameters())}
    return (model, args.data, config["model"]["max_len"], config["model"]["vocab_size"],
            extra)


def cmd_evaluate(args):
    from .train import masked_valid, mlm_perplexity
    model, data, seq_len, vocab, extra = _evaluated_model(args)
    inputs, labels = masked_valid(data, seq_len, vocab)
    ppl = mlm_perplexity(model, inputs, labels, device=args.device)
    _write_json(args.json, {"perplexity": ppl, "vocab_size": vocab, **extra})


def cmd_search(args):
    from .search import search
    result = search(args.run, args.max_params, cli.evolution_config(args), device=args.device,
                    valid_blocks=args.valid_blocks)
    _write_json(args.json, result)


def cmd_export(args):
    from .train import export_run
    info = export_run(args.run, args.arch, args.out, device=args.device)
    print(json.dumps(info))


def cmd_study(args):
    from ..common.study import Study
    from .study import BertStudy
    family = BertStudy(args.data, args.preset, args.space, args.num_experts, args.router_hidden,
                       {"pre": True, "post": False}[args.norm], args.seq_len, args.batch_size,
                       args.dropout, args.valid_blocks)
    Study(family, cli.study_config(args), args.out, cli.runtime_config(args),
          log=lambda m: print(m, file=sys.stderr, flush=True)).run()


def _train_parser(sub) -> None:
    from .space import PRESETS
    t = sub.add_parser("train", help="MLM pretraining of the supernet")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    t.add_argument("--space", default="supershaper", choices=["supershaper", "homogeneous"])
    t.add_argument("--batch-size", type=int, default=None,
                   help="sequences per process (default: the preset's)")
    t.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    t.add_argument("--dropout", type=float, default=None, help="default: the preset's")
    t.add_argument("--norm", default="post", choices=["post", "pre"],
                   help="LayerNorm after each sub-block (BERT) or before it")
    t.add_argument("--arch", default=None,
                   help="train this architecture of the space alone, from scratch (a static "
                        "BERT): largest | smallest | ARCH.json | inline JSON")
    cli.add_train_flags(t, seed=0)
    t.set_defaults(func=cmd_train, checkpoint_minutes=2.0)


def _search_parser(sub) -> None:
    s = sub.add_parser("search", help="evolutionary search under a parameter budget")
    s.add_argument("--run", required=True)
    s.add_argument("--max-params", type=int, required=True)
    cli.add_evolution_flags(s)
    s.add_argument("--valid-blocks", type=int, default=None,
                   help="score on the first N validation blocks only (faster)")
    s.add_argument("--json", required=True)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_search)


def _study_parser(sub) -> None:
    from .space import PRESETS
    s = sub.add_parser("study", help="supernet-quality study: inherited against standalone "
                       "perplexity of K architectures for each supernet kind")
    s.add_argument("--data", required=True)
    s.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    s.add_argument("--space", default="supershaper", choices=["supershaper", "homogeneous"])
    s.add_argument("--batch-size", type=int, default=None,
                   help="sequences per training batch (default: the preset's)")
    s.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    s.add_argument("--dropout", type=float, default=None, help="default: the preset's")
    s.add_argument("--norm", default="post", choices=["post", "pre"])
    s.add_argument("--valid-blocks", type=int, default=None,
                   help="score on the first N validation blocks (default: all)")
    cli.add_study_flags(s, seed=0)
    cli.add_runtime_flags(s)
    s.set_defaults(func=cmd_study)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mos_models.bert",
                                description="BERT supernet with Mixture-of-Supernets FFNs")
    cli.add_threads_flag(p, top_level=True)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="build the corpus, tokenizer and token streams")
    d.add_argument("--out", required=True)
    d.add_argument("--text", nargs="+", help="plain-text files, one document per line "
                   "(default: the Python standard library's docstrings)")
    d.add_argument("--vocab-size", type=int, default=4000)
    d.add_argument("--valid-percent", type=int, default=8)
    d.set_defaults(func=cmd_data)
    _train_parser(sub)
    e = sub.add_parser("evaluate", help="validation MLM perplexity")
    e.add_argument("--run")
    e.add_argument("--arch", help="largest | smallest | ARCH.json | inline JSON")
    e.add_argument("--model", help="an exported model directory")
    e.add_argument("--data", help="data directory (default for --run: the run's)")
    e.add_argument("--json", required=True)
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_evaluate)
    _search_parser(sub)
    _study_parser(sub)
    x = sub.add_parser("export", help="export an architecture as a static BERT")
    x.add_argument("--run", required=True)
    x.add_argument("--arch", required=True, help="largest | smallest | ARCH.json | inline JSON")
    x.add_argument("--out", required=True)
    x.add_argument("--device", default="cpu")
    x.set_defaults(func=cmd_export)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    cli.apply_threads(args)
    args.func(args)


if __name__ == "__main__":
    main()
