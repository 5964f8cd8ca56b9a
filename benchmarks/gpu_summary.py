"""A markdown summary of a GPU run (benchmarks/gpu_run.sh): device, build, tests, kernel time per
strategy and shape (roofline.py --measure JSON), host time per call (bench_host.py JSON).

    python benchmarks/gpu_summary.py --dir $OUT > $OUT/summary.md

Every input is optional: a step that failed or timed out leaves its part marked missing.
"""
import argparse
import json
import os
import re


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def tests_part(log):
    """pytest's final line per test run in the log, and the failures it names."""
    if log is None:
        return ["no test log"]
    lines = log.splitlines()
    finals = [line.strip("= ") for line in lines
              if re.search(r"\d+ (passed|failed|error)", line) and " in " in line]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    out = [f"- {line}" for line in finals]
    # A run cut by its timeout prints no summary: count its progress characters instead.
    progress = "".join(re.sub(r"\s*\[\s*\d+%\]$", "", line) for line in lines
                       if re.fullmatch(r"[.FEsxX]+(\s*\[\s*\d+%\])?", line.strip()))
    if len(finals) < log.count("== tests-") or not finals:
        out.append(f"- progress of all runs: {progress.count('.')} passed, {progress.count('F')} "
                   f"failed, {progress.count('E')} errors, {progress.count('s')} skipped "
                   "(a run without a summary line above was cut by its timeout)")
    if failed:
        out += ["", "Failures:", ""] + [f"    {line}" for line in failed[:40]]
    return out


def kernel_part(data):
    """Measured GPU ms per call (CUDA events over many calls) and each provider / dense."""
    if data is None:
        return ["no kernel-time JSON"]
    rows = [r for r in data.get("rows", []) if "measured" in r]
    if not rows:
        return ["no measured rows"]
    providers = [p for p in rows[0]["measured"] if p != "dense"]
    head = "| shape | T | m | mode | dense ms | " + " | ".join(f"{p} / dense" for p in providers)
    out = [f"Measured on {data.get('measured_on')} ({rows[0].get('dtype')}): GPU time per call "
           "(CUDA events around many calls), ratio to the dense slice; in brackets the roofline "
           "model's ratio.", "", head + " |", "|" + "---|" * (5 + len(providers))]
    for r in rows:
        for mode in ("fwd", "fwdbwd"):
            dense = r["measured"]["dense"][mode]
            cells = []
            for p in providers:
                v = r["measured"].get(p)
                if v is None:
                    cells.append("")
                    continue
                cell = f"{v[mode] / dense:.2f}"
                pred = (r.get("predicted") or {}).get(p)
                if pred is not None:
                    cell += f" [{pred[mode] / r['predicted']['dense'][mode]:.2f}]"
                cells.append(cell)
            out.append(f"| {r['shape']} | {r['tokens']} | {r['m']} | {mode} | "
                       f"{1e3 * dense:.3f} | " + " | ".join(cells) + " |")
    plans = {p: v.get("plan") for p, v in rows[0]["measured"].items() if v.get("plan")}
    if plans:
        out += ["", "Plans (backend, strategy) of the first row: " + ", ".join(
            f"{p} = {'/'.join(v)}" for p, v in plans.items())]
    return out


def host_part(data):
    if data is None:
        return ["no host-time JSON"]
    shape = data["shape"]
    out = [f"K = {shape['K']}, N = {shape['N']}, T = {shape['T']}, m = {shape['m']}, "
           f"{data['environment']['dtype']}, {data['reps']} interleaved repetitions of "
           f"{data['inner']} calls; median wall time per call.", "",
           "| case | runs | mode | us | ratio |", "|---|---|---|---|---|"]
    for r in data["results"]:
        ratio = f"{r['ratio']:.2f} (/ {r['baseline']})" if r["ratio"] is not None else ""
        plan = "/".join(r["plan"]) if r["plan"] else ""
        out.append(f"| {r['label']} | {plan} | {r['mode']} | {r['us']:.1f} | {ratio} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="the run's output folder ($OUT)")
    args = ap.parse_args(argv)

    def load(name):
        text = read(os.path.join(args.dir, name))
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    lines = ["# GPU run", "", "## Device", "", "```", (read(os.path.join(args.dir, "device.txt"))
                                                     or "no device.txt").strip(), "```", "",
             "## Steps", "", "```", (read(os.path.join(args.dir, "steps.txt")) or "").strip(),
             "```", "", "## Tests", ""]
    lines += tests_part(read(os.path.join(args.dir, "tests.log")))
    lines += ["", "## Kernel time", ""] + kernel_part(load("kernel_time.json"))
    lines += ["", "## Host time per call", ""] + host_part(load("host_time.json"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
