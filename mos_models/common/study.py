"""The supernet-quality study: how close do a supernet's sub-networks come to the same
architectures trained from scratch? (The paper's Table 4: MAE and Kendall tau between the
inherited and the standalone scores of random architectures.)

``Study(family, config, out, runtime).run()`` does, in the directory ``out``:

1. picks ``config.archs`` architectures (``pick_architectures``: the space's smallest and
   largest and, between them, architectures spread evenly over the parameter range, drawn with
   a fixed seed) and writes them with the settings to ``plan.json``;
2. trains one supernet of each kind (``runs/supernet_<kind>_seed<seed>``) with the same data,
   seed (so the same batch order), sampling and budget, then each architecture alone from
   scratch (``runs/standalone_<i>``) with the same per-architecture budget, then the kinds in
   ``noise_kinds`` again with each further seed (the noise floor); every run goes through the
   shared training core (``trainer.train``);
3. scores every (supernet, architecture) from the inherited weights (the exported static
   sub-network) and every standalone model with one scorer, on the same sentences
   (``scores/<run>.json``);
4. writes ``study.json`` (settings, architectures, every row, the summary), ``study.md`` (the
   tables) and ``study.png`` (inherited against standalone scores, one colour per kind, the
   diagonal drawn).

Run again on the same ``out`` it resumes: finished runs (``metrics.json`` present) are not
retrained, a run with checkpoints continues through the core's --resume, scores already written
are kept. A model family (MT, BERT) plugs in through ``StudyFamily``.
"""
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import trainer
from .checkpoint import latest_checkpoint
from .elastic import KINDS
from .evolution import Arch, GeneSpace
from .run import load_run, write_json
from .training import SAMPLING

STUDY_FORMAT = "mos-study/1"
Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# metrics

def mae(a: Sequence[float], b: Sequence[float]) -> float:
    """Mean absolute difference of two equally long sequences."""
    _check_pairs(a, b, "mae")
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def mean_gap(a: Sequence[float], b: Sequence[float]) -> float:
    """Mean of a - b (for the study: inherited - standalone)."""
    _check_pairs(a, b, "mean_gap")
    return sum(x - y for x, y in zip(a, b)) / len(a)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two rankings (scipy.stats.kendalltau's default): (concordant -
    discordant) / sqrt((pairs - pairs tied in x) (pairs - pairs tied in y)); a pair tied in both
    counts in neither. NaN when one side is constant (or has fewer than two values)."""
    _check_pairs(x, y, "kendall_tau")
    n = len(x)
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            tied_x += dx == 0
            tied_y += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denominator if denominator > 0 else math.nan


def compare(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """MAE, Kendall tau and mean gap (a - b) of two score lists over the same architectures."""
    return {"mae": mae(a, b), "kendall_tau": kendall_tau(a, b), "mean_gap": mean_gap(a, b),
            "n": len(a)}


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def _check_pairs(a: Sequence[float], b: Sequence[float], what: str) -> None:
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"{what}: needs two non-empty sequences of one length, got {len(a)} "
                         f"and {len(b)} values")


# ----------------------------------------------------------------------------------------------
# the architectures

def pick_architectures(space: GeneSpace, count: int, size: Callable[[Arch], int],
                       seed: int = 0, pool: int = 300) -> List[Arch]:
    """``count`` distinct architectures of ``space``, fewest parameters first: the space's
    smallest and largest and, between them, for each of the ``count - 2`` sizes evenly spaced
    between theirs, the candidate nearest to it (first drawn wins a tie) among ``pool``
    architectures drawn with ``random.Random(seed)``. Deterministic; ``size`` is the parameter
    count (machine-independent, unlike latency)."""
    if count < 2:
        raise ValueError(f"pick_architectures: count must be >= 2 (smallest and largest), "
                         f"got {count}")
    ends = [space.smallest(), space.largest()]
    low, high = size(ends[0]), size(ends[1])
    rng = random.Random(seed)
    seen = {space.key(arch) for arch in ends}
    candidates: List[Tuple[int, Arch]] = []
    for _ in range(pool):
        arch = space.sample(rng)
        if space.key(arch) not in seen:
            seen.add(space.key(arch))
            candidates.append((size(arch), arch))
    if len(candidates) < count - 2:
        raise ValueError(f"pick_architectures: {pool} draws gave {len(candidates)} distinct "
                         f"architectures besides the two ends, fewer than the {count - 2} needed")
    middle = []
    for j in range(1, count - 1):
        target = low + (high - low) * j / (count - 1)
        best = min(range(len(candidates)), key=lambda i: (abs(candidates[i][0] - target), i))
        middle.append(candidates.pop(best))
    middle.sort(key=lambda sa: sa[0])
    return [ends[0]] + [arch for _, arch in middle] + [ends[1]]


# ----------------------------------------------------------------------------------------------
# what a model family provides, and the study's settings

@dataclass(frozen=True)
class Metric:
    name: str               # key of the score dicts
    label: str              # for tables and plots
    higher_is_better: bool


class StudyFamily:
    """What a model family (MT, BERT) gives the study. ``task_class`` is its trainer.Task."""

    name = "family"
    metrics: Tuple[Metric, ...] = ()
    task_class: type = None

    def space(self) -> GeneSpace:
        raise NotImplementedError

    def params(self, arch: Arch) -> int:
        """Parameters of the static model of ``arch`` (what the standalone trains)."""
        raise NotImplementedError

    def describe(self, arch: Arch) -> str:
        return json.dumps(arch)

    def supernet_config(self, kind: str) -> Any:
        """The task config of a supernet of ``kind``."""
        raise NotImplementedError

    def standalone_config(self, arch: Arch) -> Any:
        """The task config of ``arch`` trained alone from scratch."""
        raise NotImplementedError

    def static(self, supernet: nn.Module, arch: Arch) -> nn.Module:
        """The static sub-network of ``arch`` with the supernet's (inherited) weights."""
        return supernet.export(arch)

    def scorer(self, device) -> Callable[[nn.Module], Dict[str, float]]:
        """A function scoring a static model (every metric), its data loaded once."""
        raise NotImplementedError

    def settings(self) -> Dict:
        """What the family's runs and scores depend on (data, preset, scoring settings)."""
        return {}


@dataclass
class StudyConfig:
    archs: int = 8
    kinds: Tuple[str, ...] = ("standard", "layer", "neuron")
    sampling: str = "sandwich"
    seeds: Tuple[int, ...] = (1,)          # the first: every run; the others: noise_kinds only
    noise_kinds: Optional[Tuple[str, ...]] = None   # None: every kind
    supernet_minutes: Optional[float] = None
    supernet_steps: Optional[int] = None
    standalone_minutes: Optional[float] = None
    standalone_steps: Optional[int] = None
    pick_seed: int = 0
    pool: int = 300
    checkpoint_minutes: float = 1.0        # how much a killed run can lose (not compared on resume)

    def __post_init__(self):
        self.kinds, self.seeds = tuple(self.kinds), tuple(int(s) for s in self.seeds)
        if self.noise_kinds is not None:
            self.noise_kinds = tuple(self.noise_kinds)
        bad = [k for k in self.kinds + (self.noise_kinds or ()) if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"study: kinds must be among {KINDS}, got {list(self.kinds)} "
                             f"(noise kinds {list(self.noise_kinds or ())})")
        if self.noise_kinds and set(self.noise_kinds) - set(self.kinds):
            raise ValueError(f"study: noise kinds {list(self.noise_kinds)} must be among the "
                             f"kinds {list(self.kinds)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study: seeds must be distinct, at least one, got {self.seeds}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"study: sampling must be one of {SAMPLING}, got {self.sampling!r}")
        for group in ("supernet", "standalone"):
            minutes, steps = getattr(self, f"{group}_minutes"), getattr(self, f"{group}_steps")
            if minutes is None and steps is None:
                raise ValueError(f"study: give {group}_minutes or {group}_steps (or both: "
                                 "whichever ends first)")
        if self.archs < 2:
            raise ValueError(f"study: archs must be >= 2, got {self.archs}")


class Job(NamedTuple):
    name: str               # the run directory's name, runs/<name>
    kind: Optional[str]     # a supernet kind; None: a standalone model
    seed: int
    arch: Optional[int]     # the standalone's architecture index


# ----------------------------------------------------------------------------------------------
# the study

class Study:
    def __init__(self, family: StudyFamily, config: StudyConfig, out, runtime: trainer.TrainConfig,
                 log: Log = print):
        """``runtime``: the trainer's runtime options (backend, device, amp, progress...); the
        study sets the rest (out, seed, sampling, budgets, resume, checkpoints)."""
        self.family, self.config, self.out, self.log = family, config, Path(out), log
        self.runtime = runtime
        self.device = runtime.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._scorer = None
        self.started_in: Optional[Dict] = None  # environment() when run() began

    # -- plan -----------------------------------------------------------------------------------
    def settings(self) -> Dict:
        config = {k: v for k, v in asdict(self.config).items() if k != "checkpoint_minutes"}
        return json.loads(json.dumps({"family": self.family.name, "study": config,
                                      "task": self.family.settings()}))

    def plan(self) -> List[Dict]:
        """The architectures (from plan.json when the study was started before)."""
        path = self.out / "plan.json"
        settings = self.settings()
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") != settings:
                changed = _changed(saved.get("settings", {}), settings)
                raise ValueError(f"{self.out} holds a study with other settings ({changed}); "
                                 "run it with its own flags, or choose another --out")
            return saved["archs"]
        c = self.config
        archs = pick_architectures(self.family.space(), c.archs, self.family.params,
                                   c.pick_seed, c.pool)
        entries = [{"index": i, "params": self.family.params(a),
                    "description": self.family.describe(a), "arch": a}
                   for i, a in enumerate(archs)]
        write_json(path, {"format": STUDY_FORMAT, "settings": settings, "archs": entries})
        return entries

    def jobs(self, archs: List[Dict]) -> List[Job]:
        """Main-seed supernets, standalones, then the noise floor's extra seeds."""
        c = self.config
        first, others = c.seeds[0], c.seeds[1:]
        jobs = [Job(f"supernet_{k}_seed{first}", k, first, None) for k in c.kinds]
        jobs += [Job(f"standalone_{a['index']}", None, first, a["index"]) for a in archs]
        for seed in others:
            jobs += [Job(f"supernet_{k}_seed{seed}", k, seed, None)
                     for k in c.kinds if c.noise_kinds is None or k in c.noise_kinds]
        return jobs

    # -- the whole study ------------------------------------------------------------------------
    def run(self) -> Dict:
        self.out.mkdir(parents=True, exist_ok=True)
        # the code that trains is the code at the start: main may move on during a long study
        self.started_in = environment()
        archs = self.plan()
        jobs = self.jobs(archs)
        self.log(f"study: {len(archs)} architectures of {archs[0]['params']:,} to "
                 f"{archs[-1]['params']:,} parameters, {len(jobs)} runs; "
                 + self._status(jobs, archs))
        start = time.monotonic()
        for number, job in enumerate(jobs, 1):
            minutes = (time.monotonic() - start) / 60
            prefix = f"[study {number}/{len(jobs)}, {minutes:.0f} min] {job.name}"
            self._train(job, prefix, archs)
            self._score(job, prefix, archs)
        report = self.report(archs, jobs)
        self.log(f"study: done; {self.out / 'study.json'}, study.md, study.png\n"
                 + summary_table(report))
        return report

    def _status(self, jobs: List[Job], archs: List[Dict]) -> str:
        trained = sum((self._run_dir(j) / "metrics.json").exists() for j in jobs)
        started = sum(latest_checkpoint(self._run_dir(j)) is not None for j in jobs) - trained
        scored = sum(len(self._scores(j)) == self._expected(j, archs) for j in jobs)
        return (f"{trained} trained, {started} half-trained (resumed), {scored} scored; "
                f"output in {self.out}")

    # -- training -------------------------------------------------------------------------------
    def _run_dir(self, job: Job) -> Path:
        return self.out / "runs" / job.name

    def _train(self, job: Job, prefix: str, archs: List[Dict]) -> None:
        out = self._run_dir(job)
        if (out / "metrics.json").exists():
            return
        c = self.config
        if job.kind is None:
            task = self.family.task_class(self.family.standalone_config(archs[job.arch]["arch"]))
            steps, minutes = c.standalone_steps, c.standalone_minutes
            what = f"standalone {archs[job.arch]['description']}"
        else:
            task = self.family.task_class(self.family.supernet_config(job.kind))
            steps, minutes = c.supernet_steps, c.supernet_minutes
            what = f"{job.kind} supernet, {c.sampling} sampling, seed {job.seed}"
        resume = latest_checkpoint(out) is not None
        budget = " or ".join(f"{v:g} {unit}" for v, unit in ((steps, "steps"),
                                                             (minutes, "min")) if v is not None)
        self.log(f"{prefix}: {'resuming' if resume else 'training'} {what} ({budget})")
        cfg = replace(self.runtime, out=str(out), seed=job.seed, sampling=c.sampling,
                      max_steps=steps, max_minutes=minutes, resume=resume,
                      checkpoint_minutes=c.checkpoint_minutes,
                      save_every=None if steps is None else max(1, steps // 4))
        result = trainer.train(task, cfg, self.log)
        self.log(f"{prefix}: trained {result['step']} steps in {result['seconds']:.0f} s")

    # -- scoring --------------------------------------------------------------------------------
    def _scores_path(self, job: Job) -> Path:
        return self.out / "scores" / f"{job.name}.json"

    def _scores(self, job: Job) -> Dict[str, Dict[str, float]]:
        path = self._scores_path(job)
        return json.loads(path.read_text())["scores"] if path.exists() else {}

    @staticmethod
    def _expected(job: Job, archs: List[Dict]) -> int:
        return 1 if job.kind is None else len(archs)

    def _score(self, job: Job, prefix: str, archs: List[Dict]) -> None:
        scores = self._scores(job)
        todo = [a for a in archs if str(a["index"]) not in scores
                and (job.kind is not None or a["index"] == job.arch)]
        if not todo:
            return
        path = self._scores_path(job)
        seconds = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
        self.log(f"{prefix}: scoring {len(todo)} architecture(s)")
        if self._scorer is None:
            self._scorer = self.family.scorer(self.device)
        model, _ = load_run(self._run_dir(job), self.family.task_class, self.device,
                                    self.log)
        for entry in todo:
            start = time.perf_counter()
            static = model if job.kind is None else self.family.static(model, entry["arch"])
            scores[str(entry["index"])] = self._scorer(static.to(self.device).eval())
            seconds += time.perf_counter() - start
            write_json(path, {"scores": scores, "seconds": seconds})
            self.log(f"{prefix}: architecture {entry['index']} ({entry['params']:,} params): "
                     + ", ".join(f"{m.label} {scores[str(entry['index'])][m.name]:.4g}"
                                 for m in self.family.metrics))

    # -- the report -----------------------------------------------------------------------------
    def report(self, archs: List[Dict], jobs: List[Job]) -> Dict:
        """Writes study.json, study.md and study.png from the scores; returns study.json."""
        metrics = self.family.metrics
        standalone = {j.arch: self._scores(j)[str(j.arch)] for j in jobs if j.kind is None}
        supernets = [j for j in jobs if j.kind is not None]
        inherited = {j.name: self._scores(j) for j in supernets}
        rows, summary, noise = [], [], []
        for job in supernets:
            for a in archs:
                inh, std = inherited[job.name][str(a["index"])], standalone[a["index"]]
                rows.append({"kind": job.kind, "seed": job.seed, "arch": a["index"],
                             "params": a["params"], "inherited": inh, "standalone": std,
                             "gap": {m.name: inh[m.name] - std[m.name] for m in metrics}})
            for m in metrics:
                summary.append({"kind": job.kind, "seed": job.seed, "metric": m.name,
                                **compare(*self._columns(inherited[job.name], standalone,
                                                         archs, m))})
            first = f"supernet_{job.kind}_seed{self.config.seeds[0]}"
            if job.seed != self.config.seeds[0]:
                for m in metrics:
                    noise.append({"kind": job.kind, "seeds": [self.config.seeds[0], job.seed],
                                  "metric": m.name, **compare(*self._columns(
                                      inherited[job.name], _by_index(inherited[first]), archs,
                                      m))})
        report = {"format": STUDY_FORMAT, "settings": self.settings(),
                  "metrics": [asdict(m) for m in metrics], "archs": archs,
                  "runs": [self._run_info(j) for j in jobs], "rows": rows, "summary": summary,
                  "noise_floor": noise,
                  "environment": self.started_in or environment()}
        write_json(self.out / "study.json", report)
        (self.out / "study.md").write_text(markdown(report))
        plot(report, self.out / "study.png", self.log)
        return report

    @staticmethod
    def _columns(scores: Dict[str, Dict], reference: Dict[int, Dict], archs: List[Dict],
                 metric: Metric) -> Tuple[List[float], List[float]]:
        return ([scores[str(a["index"])][metric.name] for a in archs],
                [reference[a["index"]][metric.name] for a in archs])

    def _run_info(self, job: Job) -> Dict:
        metrics = json.loads((self._run_dir(job) / "metrics.json").read_text())
        path = self._scores_path(job)
        return {"name": job.name, "kind": job.kind or "standalone", "seed": job.seed,
                "arch": job.arch, "steps": metrics["step"], "train_seconds": metrics["seconds"],
                "score_seconds": json.loads(path.read_text())["seconds"]}


def _by_index(scores: Dict[str, Dict]) -> Dict[int, Dict]:
    return {int(k): v for k, v in scores.items()}


def _changed(old: Dict, new: Dict, prefix: str = "") -> str:
    keys = sorted(set(old) | set(new))
    parts = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _changed(a, b, f"{prefix}{k}.")
            if inner:
                parts.append(inner)
        elif a != b:
            parts.append(f"{prefix}{k}: {a!r} then, {b!r} now")
    return "; ".join(parts)


def environment() -> Dict:
    """Where the study ran (for the record; not part of its settings)."""
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "command": " ".join(getattr(sys, "orig_argv", sys.argv))}
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        info["commit"] = (commit + ("-dirty" if dirty else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


# ----------------------------------------------------------------------------------------------
# tables and the plot

def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"


def _comparison_table(report: Dict, entries: List[Dict], heads: List[str],
                      lead: Callable[[Dict], Tuple[str, ...]]) -> str:
    """Markdown: one row per ``lead(entry)`` (the first cells), then each metric's MAE,
    Kendall tau and mean gap from the entries of that row."""
    metrics = [Metric(**m) for m in report["metrics"]]
    lines = ["| " + " | ".join(heads) + " | " + " | ".join(
        f"{m.label} MAE | {m.label} tau | {m.label} gap" for m in metrics) + " |",
        "|" + "---|" * (len(heads) + 3 * len(metrics))]
    rows: Dict[Tuple[str, ...], Dict[str, Dict]] = {}
    for e in entries:
        rows.setdefault(lead(e), {})[e["metric"]] = e
    for cells, by_metric in rows.items():
        cells = list(cells)
        for m in metrics:
            e = by_metric[m.name]
            cells += [_fmt(e["mae"]), _fmt(e["kendall_tau"]), _fmt(e["mean_gap"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(report: Dict) -> str:
    """Markdown: per supernet (kind, seed), each metric's MAE, Kendall tau and mean gap."""
    steps = {(r["kind"], r["seed"]): r["steps"] for r in report["runs"]}
    return _comparison_table(report, report["summary"], ["supernet", "seed", "steps"],
                             lambda s: (s["kind"], str(s["seed"]),
                                        str(steps[(s["kind"], s["seed"])])))


def noise_table(report: Dict) -> str:
    """Markdown: the same comparison between two seeds' inherited scores of one kind."""
    return _comparison_table(report, report["noise_floor"], ["supernet", "seeds"],
                             lambda n: (n["kind"], " vs ".join(map(str, n["seeds"]))))


def arch_table(report: Dict) -> str:
    """Markdown: each architecture's standalone and inherited scores."""
    metrics = [Metric(**m) for m in report["metrics"]]
    models = list(dict.fromkeys((r["kind"], r["seed"]) for r in report["rows"]))
    cell = {(r["kind"], r["seed"], r["arch"]): r["inherited"] for r in report["rows"]}
    standalone = {r["arch"]: r["standalone"] for r in report["rows"]}
    seeds = {seed for _, seed in models}
    names = [kind if len(seeds) == 1 else f"{kind} s{seed}" for kind, seed in models]
    head = ["#", "params", "architecture"]
    for m in metrics:
        head += [f"{m.label}: standalone"] + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in report["archs"]:
        cells = [str(a["index"]), f"{a['params']:,}", a["description"]]
        for m in metrics:
            cells.append(_fmt(standalone[a["index"]][m.name]))
            cells += [_fmt(cell[(k, s, a["index"])][m.name]) for k, s in models]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: Dict) -> str:
    s = report["settings"]
    study, task = s["study"], s["task"]

    def budget(group):
        parts = [f"{study[group + '_' + u]:g} {label}" for u, label in
                 (("minutes", "min"), ("steps", "steps")) if study[group + "_" + u] is not None]
        return " or ".join(parts)

    lines = [f"# Supernet-quality study ({s['family']})", "",
             f"{len(report['archs'])} architectures (smallest, largest and spread over the "
             f"parameter range; pick seed {study['pick_seed']}); supernets: {budget('supernet')},"
             f" {study['sampling']} sampling, seeds {study['seeds']}; standalone models: "
             f"{budget('standalone')} each. Task: " + ", ".join(
                 f"{k} {v}" for k, v in task.items()) + ".", "",
             "gap = inherited - standalone (mean over the architectures); tau = Kendall's "
             "tau-b between the two rankings.", "",
             "## Inherited against standalone", "", summary_table(report), ""]
    if report["noise_floor"]:
        lines += ["## Noise floor: two seeds of one kind (inherited scores)", "",
                  noise_table(report), ""]
    lines += ["## Architectures", "", arch_table(report), ""]
    runs = report["runs"]
    lines += ["## Time", "", "| run | steps | train s | score s |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['steps']} | {r['train_seconds']:.1f} | "
              f"{r['score_seconds']:.1f} |" for r in runs]
    env = report["environment"]
    lines += ["", f"Command: `{env['command']}`; commit {env['commit']}; torch {env['torch']}, "
              f"{env['threads']} threads, {env['cpus']} CPUs.", ""]
    return "\n".join(lines)


COLOURS = {"standard": "tab:blue", "layer": "tab:orange", "neuron": "tab:green"}


def plot(report: Dict, path, log: Log = print) -> Optional[Path]:
    """Inherited (y) against standalone (x) scores, one panel per metric, one colour per kind
    (further seeds: hollow markers), the diagonal dashed. Skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("study: matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    metrics = [Metric(**m) for m in report["metrics"]]
    first_seed = report["settings"]["study"]["seeds"][0]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 5), squeeze=False)
    models = list(dict.fromkeys((r["kind"], r["seed"]) for r in report["rows"]))
    for ax, m in zip(axes[0], metrics):
        values = []
        for kind, seed in models:
            rows = [r for r in report["rows"] if (r["kind"], r["seed"]) == (kind, seed)]
            x = [r["standalone"][m.name] for r in rows]
            y = [r["inherited"][m.name] for r in rows]
            values += x + y
            colour = COLOURS.get(kind, "tab:red")
            hollow = seed != first_seed
            ax.scatter(x, y, s=36, label=f"{kind} (seed {seed})", edgecolors=colour,
                       facecolors="none" if hollow else colour)
        pad = 0.05 * (max(values) - min(values) or 1.0)
        low, high = min(values) - pad, max(values) + pad
        ax.plot([low, high], [low, high], "k--", lw=1, label="inherited = standalone")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_aspect("equal")
        ax.set_xlabel(f"standalone {m.label}")
        ax.set_ylabel(f"inherited {m.label}")
        ax.set_title(f"{m.label} ({'higher' if m.higher_is_better else 'lower'} is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
