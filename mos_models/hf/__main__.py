"""Command line: python -m mos_models.hf train|evaluate|search|export (see README.md)

    train     --model DIR --out RUN [--data TEXT_DIR] [--supernet neuron|layer|standard]
              [--teacher original|largest] [--max-steps N] [--max-minutes M] [--resume]
    evaluate  --run RUN [--ffn N] [--layers L] --json OUT
    search    --run RUN --max-params N --json OUT
    export    --run RUN [--ffn N] [--layers L] --out DIR

Several processes: torchrun --nproc_per_node=N -m mos_models.hf train ...
"""
import argparse
import json
import sys

from ..common import cli
from ..common.run import write_json


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _choices(text):
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def cmd_train(a) -> None:
    from .train import HFConfig, train
    config = HFConfig(model=a.model, data=a.data, supernet=a.supernet, num_experts=a.num_experts,
                      router_hidden=a.router_hidden, teacher=a.teacher, distill=a.distill,
                      temperature=a.temperature, distill_weight=a.distill_weight,
                      batch_size=a.batch_size, max_length=a.max_length,
                      calibration_batches=a.calibration_batches, valid_every=a.valid_every,
                      ffn_choices=_choices(a.ffn_choices), layer_choices=_choices(a.layer_choices))
    train(config, cli.train_config(a), log=_log)


def _write(path: str, result) -> None:
    write_json(path, result)
    print(json.dumps({k: v for k, v in result.items() if k != "candidates"}))


def cmd_evaluate(a) -> None:
    from .runs import evaluate_run
    _write(a.json, evaluate_run(a.run, a.ffn, a.layers, a.device, log=_log))


def cmd_search(a) -> None:
    from .runs import search_run
    _write(a.json, search_run(a.run, a.max_params, a.device, log=_log))


def cmd_export(a) -> None:
    from .runs import export_run
    print(json.dumps(export_run(a.run, a.ffn, a.layers, a.out, a.device, log=_log)))


def _train_parser(sub) -> None:
    from .distill import DISTILL_KINDS
    from .train import TEACHERS
    t = sub.add_parser("train", help="sandwich training with in-place distillation")
    t.add_argument("--model", required=True, help="a Hugging Face model directory (with its "
                   "tokenizer): BERT-style encoder or Llama-style decoder")
    t.add_argument("--out", required=True)
    t.add_argument("--data", default=None, help="a .txt file or a directory of them, one "
                   "sentence or document per line (default: the embedded corpus.txt)")
    t.add_argument("--teacher", default="original", choices=TEACHERS,
                   help="the source model (frozen), or the step's largest sub-network")
    t.add_argument("--distill", default="auto", choices=DISTILL_KINDS,
                   help="auto: KL on logits for models with a head, cosine of hidden states else")
    t.add_argument("--temperature", type=float, default=1.0, help="of the KL distillation")
    t.add_argument("--distill-weight", type=float, default=1.0,
                   help="distillation loss weight (the LM loss has weight 1)")
    t.add_argument("--batch-size", type=int, default=16, help="sentences per step and process")
    t.add_argument("--max-length", type=int, default=64, help="tokens per sentence")
    t.add_argument("--calibration-batches", type=int, default=4,
                   help="batches for importance ordering (0: keep the model's order)")
    t.add_argument("--valid-every", type=int, default=5,
                   help="every N-th sentence is held out for evaluate and search")
    t.add_argument("--ffn-choices", default=None, help="comma-separated FFN widths "
                   "(default: 1/4, 1/2, 3/4, 1 x intermediate_size)")
    t.add_argument("--layer-choices", default=None, help="comma-separated layer counts "
                   "(default: ceil(L/3)..L)")
    cli.add_train_flags(t, seed=0)
    t.set_defaults(func=cmd_train, checkpoint_minutes=2.0)


def _arch_flags(p) -> None:
    p.add_argument("--run", required=True)
    p.add_argument("--ffn", type=int, default=None, help="FFN width (default: full)")
    p.add_argument("--layers", type=int, default=None, help="layer count (default: all)")
    p.add_argument("--device", default="cpu")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mos_models.hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_threads_flag(p, top_level=True)
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    e = sub.add_parser("evaluate", help="held-out perplexity (LMs) or teacher cosine (encoders)")
    _arch_flags(e)
    e.add_argument("--json", required=True)
    e.set_defaults(func=cmd_evaluate)
    s = sub.add_parser("search", help="the best architecture of the grid under a parameter budget")
    s.add_argument("--run", required=True)
    s.add_argument("--max-params", type=int, required=True)
    s.add_argument("--json", required=True)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_search)
    x = sub.add_parser("export", help="an architecture as a stock Hugging Face model directory")
    _arch_flags(x)
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_export)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    cli.apply_threads(args)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:   # bad input: the message, no traceback
        sys.exit(f"python -m mos_models.hf {args.command}: error: {exc}")


if __name__ == "__main__":
    main()
