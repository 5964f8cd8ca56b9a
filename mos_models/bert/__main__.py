"""Command line: python -m mos_models.bert data|train|evaluate|search|export (see README.md)."""
import argparse
import json
import os
import sys


def _arch_arg(text: str, space):
    """largest | smallest | a JSON file | inline JSON -> a validated architecture."""
    if text == "largest":
        return space.largest()
    if text == "smallest":
        return space.smallest()
    if text.lstrip().startswith("{"):
        arch = json.loads(text)
    else:
        with open(text) as f:
            arch = json.load(f)
    if "arch" in arch and isinstance(arch["arch"], dict):   # a search result file
        arch = arch["arch"]
    return space.validate(arch)


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
    from .train import RunConfig, train
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg = RunConfig(data=args.data, preset=args.preset, space=args.space,
                    supernet=args.supernet, num_experts=args.experts,
                    router_hidden=args.router_hidden, sampling=args.sampling,
                    seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                    warmup_steps=args.warmup_steps, dropout=args.dropout,
                    pre_norm={"pre": True, "post": False}[args.norm],
                    steps=args.steps, max_minutes=args.max_minutes, seed=args.seed,
                    backend=args.backend, save_mixed_weight=args.save_mixed_weight,
                    amp=args.amp,
                    checkpoint_minutes=args.checkpoint_minutes)
    train(cfg, args.out, resume=args.resume, device=args.device)


def cmd_evaluate(args):
    import torch
    from .train import load_run, masked_valid, mlm_perplexity
    if (args.run is None) == (args.model is None):
        sys.exit("evaluate: give either --run RUN --arch ARCH or --model DIR --data DIR")
    if args.run is not None:
        if args.arch is None:
            sys.exit("evaluate: --run needs --arch largest|smallest|ARCH.json")
        model, cfg, _ = load_run(args.run, args.device)
        model.set_arch(_arch_arg(args.arch, model.space))
        data, seq_len, vocab = args.data or cfg.data, cfg.seq_len, cfg.vocab_size
        extra = {"arch": model.arch, "params": model.param_count()}
    else:
        from .export import load_exported
        if args.data is None:
            sys.exit("evaluate: --model needs --data DIR")
        model, info = load_exported(args.model, args.device)
        data, seq_len, vocab = args.data, info["max_len"], info["vocab_size"]
        extra = {"params": sum(p.numel() for p in model.parameters())}
    inputs, labels = masked_valid(data, seq_len, vocab)
    with torch.no_grad():
        ppl = mlm_perplexity(model, inputs, labels, device=args.device)
    _write_json(args.json, {"perplexity": ppl, "vocab_size": vocab, **extra})


def cmd_search(args):
    from mos_models.common import EvolutionConfig
    from .search import search
    config = EvolutionConfig(iterations=args.iterations, population=args.population,
                             parents=args.parents, mutations=args.mutations,
                             mutation_prob=args.mutation_prob, crossovers=args.crossovers,
                             seed=args.seed)
    result = search(args.run, args.max_params, config, device=args.device,
                    valid_blocks=args.valid_blocks)
    _write_json(args.json, result)


def cmd_export(args):
    from .export import export_run
    info = export_run(args.run, args.arch, args.out, device=args.device)
    print(json.dumps(info))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mos_models.bert",
                                description="BERT supernet with Mixture-of-Supernets FFNs")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="build the corpus, tokenizer and token streams")
    d.add_argument("--out", required=True)
    d.add_argument("--text", nargs="+", help="plain-text files, one document per line "
                   "(default: the Python standard library's docstrings)")
    d.add_argument("--vocab-size", type=int, default=4000)
    d.add_argument("--valid-percent", type=int, default=8)
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="MLM pretraining of the supernet")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    t.add_argument("--space", default="supershaper", choices=["supershaper", "homogeneous"])
    t.add_argument("--supernet", default="neuron", choices=["neuron", "layer", "standard"])
    t.add_argument("--experts", type=int, default=2)
    t.add_argument("--router-hidden", type=int, default=128)
    t.add_argument("--sampling", default="sandwich", choices=["sandwich", "spos"])
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--steps", type=int, default=0, help="0: the preset's")
    t.add_argument("--batch-size", type=int, default=0, help="per process; 0: the preset's")
    t.add_argument("--seq-len", type=int, default=0, help="0: the preset's")
    t.add_argument("--lr", type=float, default=0.0, help="0: the preset's")
    t.add_argument("--warmup-steps", type=int, default=-1, help="-1: the preset's")
    t.add_argument("--dropout", type=float, default=-1.0, help="-1: the preset's")
    t.add_argument("--norm", default="post", choices=["post", "pre"],
                   help="LayerNorm after each sub-block (BERT) or before it")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton",
                                                         "cuda"])
    t.add_argument("--save-mixed-weight", action="store_true",
                   help="MoS layers keep W_a from the forward for the backward: one combine "
                        "less per layer and step, n_out x n_in more memory per layer")
    t.add_argument("--checkpoint-minutes", type=float, default=2.0)
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    t.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                   help="mixed precision: autocast forward passes (fp16 adds loss scaling)")
    t.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (0: torch's default)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="validation MLM perplexity")
    e.add_argument("--run")
    e.add_argument("--arch", help="largest | smallest | ARCH.json | inline JSON")
    e.add_argument("--model", help="an exported model directory")
    e.add_argument("--data", help="data directory (default for --run: the run's)")
    e.add_argument("--json", required=True)
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("search", help="evolutionary search under a parameter budget")
    s.add_argument("--run", required=True)
    s.add_argument("--max-params", type=int, required=True)
    s.add_argument("--iterations", type=int, default=30)
    s.add_argument("--population", type=int, default=125)
    s.add_argument("--parents", type=int, default=25)
    s.add_argument("--mutations", type=int, default=50)
    s.add_argument("--mutation-prob", type=float, default=0.3)
    s.add_argument("--crossovers", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--valid-blocks", type=int, default=None,
                   help="score on the first N validation blocks only (faster)")
    s.add_argument("--json", required=True)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_search)

    x = sub.add_parser("export", help="export an architecture as a static BERT")
    x.add_argument("--run", required=True)
    x.add_argument("--arch", required=True, help="largest | smallest | ARCH.json | inline JSON")
    x.add_argument("--out", required=True)
    x.add_argument("--device", default="cpu")
    x.set_defaults(func=cmd_export)

    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
