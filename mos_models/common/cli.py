"""Command-line flag groups shared by the model commands (``python -m mos_models.mt`` /
``mos_models.bert``), so a flag means the same everywhere, and their readers."""
import argparse

import torch

from mos_kernels import BACKENDS, STRATEGIES

from .elastic import KINDS
from .evolution import EvolutionConfig
from .study import StudyConfig
from .trainer import TrainConfig
from .training import AMP, SAMPLING

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_threads_flag(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """``--threads N`` (torch CPU threads), on the top-level parser and on subcommands: a
    subcommand's flag leaves the top-level value alone unless given (SUPPRESS)."""
    parser.add_argument("--threads", type=int,
                        default=None if top_level else argparse.SUPPRESS,
                        help="torch CPU threads per process (default: torch's)")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def add_supernet_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("supernet")
    g.add_argument("--supernet", default="neuron", choices=KINDS,
                   help="neuron- or layer-wise MoS FFN layers, or plain weight sharing")
    g.add_argument("--sampling", default="sandwich", choices=SAMPLING,
                   help="per step: largest + smallest + one random architecture, or one random")
    g.add_argument("--experts", dest="num_experts", type=int, default=2,
                   help="experts per MoS layer (m)")
    g.add_argument("--router-hidden", type=int, default=128)


def add_budget_flags(parser: argparse.ArgumentParser, seed: int = 0) -> None:
    g = parser.add_argument_group("budget, schedule and checkpoints")
    g.add_argument("--max-steps", "--steps", dest="max_steps", type=int, default=None,
                   help="default: the preset's")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="time budget: the learning rate decays within it, then training stops")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: preset)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: the preset's")
    g.add_argument("--seed", type=int, default=seed)
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest readable checkpoint")
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints")
    g.add_argument("--checkpoint-minutes", type=float, default=None,
                   help="minutes between checkpoints")
    g.add_argument("--log-every", type=int, default=20, help="steps between log.jsonl lines")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime (how to run, not what: may change on --resume)")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="the MoS op's backend")
    g.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="the MoS op's strategy (one-pass GEMM or combine-then-GEMM)")
    g.add_argument("--save-mixed-weight", action="store_true",
                   help="MoS layers keep W_a from the forward for the backward: one combine "
                        "less per layer and step, n_out x n_in more memory per layer")
    g.add_argument("--amp", default="off", choices=list(AMP),
                   help="mixed precision: autocast forward passes (fp16 adds loss scaling)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the supernet's forward and backward (dynamic shapes: "
                        "new architectures do not recompile); CUDA graphs on GPUs")
    g.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode (default: reduce-overhead on CUDA, default on CPU)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_threads_flag(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_train_flags(parser: argparse.ArgumentParser, seed: int = 0) -> None:
    """The flag groups every ``train`` command takes: supernet, budget, runtime."""
    add_supernet_flags(parser)
    add_budget_flags(parser, seed=seed)
    add_runtime_flags(parser)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a ``train`` command's arguments (the three groups above)."""
    return TrainConfig(
        out=args.out, seed=args.seed, sampling=args.sampling, max_steps=args.max_steps,
        max_minutes=args.max_minutes, lr=args.lr, warmup_steps=args.warmup_steps,
        save_every=args.save_every, checkpoint_minutes=args.checkpoint_minutes,
        log_every=args.log_every, resume=args.resume, backend=args.backend,
        strategy=args.strategy, save_mixed_weight=args.save_mixed_weight, amp=args.amp,
        compile=args.compile, compile_mode=args.compile_mode, device=args.device,
        progress=not args.no_progress)


def add_evolution_flags(parser: argparse.ArgumentParser) -> None:
    d = EvolutionConfig()
    g = parser.add_argument_group("evolutionary search (defaults: HAT's settings)")
    g.add_argument("--iterations", type=int, default=d.iterations)
    g.add_argument("--population", type=int, default=d.population)
    g.add_argument("--parents", type=int, default=d.parents)
    g.add_argument("--mutations", type=int, default=d.mutations)
    g.add_argument("--mutation-prob", type=float, default=d.mutation_prob)
    g.add_argument("--crossovers", type=int, default=d.crossovers)
    g.add_argument("--seed", type=int, default=d.seed)


def evolution_config(args: argparse.Namespace) -> EvolutionConfig:
    return EvolutionConfig(iterations=args.iterations, population=args.population,
                           parents=args.parents, mutations=args.mutations,
                           mutation_prob=args.mutation_prob, crossovers=args.crossovers,
                           seed=args.seed)


def add_study_flags(parser: argparse.ArgumentParser, seed: int = 0) -> None:
    """The supernet-quality study's flags (``study`` of the model commands)."""
    g = parser.add_argument_group("supernet-quality study")
    g.add_argument("--out", required=True,
                   help="the study's directory; run the same command again to resume")
    g.add_argument("--archs", type=int, default=8,
                   help="architectures: the smallest, the largest and the rest spread over the "
                        "parameter range")
    g.add_argument("--kinds", default="standard,layer,neuron",
                   help="supernet kinds, comma-separated (" + ", ".join(KINDS) + ")")
    g.add_argument("--sampling", default="sandwich", choices=SAMPLING)
    g.add_argument("--seeds", default=str(seed),
                   help="comma-separated: the first trains every model; each further seed "
                        "trains the --noise-kinds supernets again (the noise floor)")
    g.add_argument("--noise-kinds", default=None,
                   help="kinds trained again with the further seeds (default: every kind)")
    g.add_argument("--supernet-minutes", type=float, default=None,
                   help="each supernet's time budget (default 10 unless --supernet-steps)")
    g.add_argument("--supernet-steps", type=int, default=None,
                   help="each supernet's step budget (deterministic; with minutes too: "
                        "whichever ends first)")
    g.add_argument("--standalone-minutes", type=float, default=None,
                   help="each standalone model's time budget (default 4 unless "
                        "--standalone-steps)")
    g.add_argument("--standalone-steps", type=int, default=None)
    g.add_argument("--pick-seed", type=int, default=0, help="seed of the architecture draw")
    g.add_argument("--pool", type=int, default=300,
                   help="random architectures drawn to pick the spread ones from")
    g.add_argument("--checkpoint-minutes", type=float, default=1.0,
                   help="minutes between checkpoints (what a killed run can lose)")
    g.add_argument("--experts", dest="num_experts", type=int, default=2)
    g.add_argument("--router-hidden", type=int, default=128)


def _names(text):
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None


def study_config(args: argparse.Namespace) -> StudyConfig:
    minutes = {}
    for group, default in (("supernet", 10.0), ("standalone", 4.0)):
        given = getattr(args, f"{group}_minutes")
        steps = getattr(args, f"{group}_steps")
        minutes[group] = default if given is None and steps is None else given
    try:
        seeds = tuple(int(s) for s in _names(args.seeds) or ())
    except ValueError:
        raise SystemExit(f"study: --seeds must be comma-separated integers, got {args.seeds!r}")
    try:
        return _study_config(args, seeds, minutes)
    except ValueError as exc:
        raise SystemExit(str(exc))


def _study_config(args, seeds, minutes) -> StudyConfig:
    return StudyConfig(archs=args.archs, kinds=_names(args.kinds) or (), sampling=args.sampling,
                       seeds=seeds, noise_kinds=_names(args.noise_kinds),
                       supernet_minutes=minutes["supernet"], supernet_steps=args.supernet_steps,
                       standalone_minutes=minutes["standalone"],
                       standalone_steps=args.standalone_steps, pick_seed=args.pick_seed,
                       pool=args.pool, checkpoint_minutes=args.checkpoint_minutes)


def runtime_config(args: argparse.Namespace) -> TrainConfig:
    """The runtime options of ``add_runtime_flags`` as a TrainConfig (``out`` left empty)."""
    return TrainConfig(out="", backend=args.backend, strategy=args.strategy,
                       save_mixed_weight=args.save_mixed_weight, amp=args.amp,
                       compile=args.compile, compile_mode=args.compile_mode, device=args.device,
                       progress=not args.no_progress)
