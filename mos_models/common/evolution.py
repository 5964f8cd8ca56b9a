"""Search spaces of named genes and a generic evolutionary search (HAT's settings by default).

An architecture is a dict ``{gene name: value}``; ``GeneSpace`` lists the allowed values of each
gene and provides sampling, the largest/smallest architectures, mutation and crossover. Spaces
with structure (e.g. per-layer genes that only matter up to a layer-count gene) subclass it and
override ``canonical`` so that equivalent architectures compare equal.

``evolutionary_search`` minimises a fitness (e.g. validation loss) over architectures that pass
a constraint (e.g. predicted latency <= limit). Each iteration keeps the ``parents`` fittest of
the population and adds ``mutations`` children (each gene of a random parent resampled with
probability ``mutation_prob``) and ``crossovers`` children (each gene from one of two random
parents); children failing the constraint are redrawn. The search is deterministic for a seed,
and each distinct architecture's fitness is computed once.
"""
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

Arch = Dict[str, Any]


class GeneSpace:
    """A search space of independent genes, each with a finite ordered list of choices."""

    def __init__(self, genes: Dict[str, Sequence[Any]]):
        if not genes:
            raise ValueError("GeneSpace: genes must name at least one gene")
        for name, choices in genes.items():
            if len(choices) == 0:
                raise ValueError(f"GeneSpace: gene {name!r} has no choices")
        self.genes = {name: list(choices) for name, choices in genes.items()}

    def canonical(self, arch: Arch) -> Arch:
        """The representative of ``arch``'s equivalence class (identity here)."""
        return dict(arch)

    def key(self, arch: Arch) -> Tuple:
        """A hashable key; equal for equivalent architectures."""
        canon = self.canonical(arch)
        return tuple(canon[name] for name in self.genes)

    def validate(self, arch: Arch) -> Arch:
        for name, choices in self.genes.items():
            if name not in arch:
                raise ValueError(f"architecture is missing gene {name!r}")
            if arch[name] not in choices:
                raise ValueError(f"gene {name!r} = {arch[name]!r} is not one of {choices}")
        extra = set(arch) - set(self.genes)
        if extra:
            raise ValueError(f"architecture has unknown genes {sorted(extra)}")
        return self.canonical(arch)

    def parse(self, spec: Union[str, os.PathLike, Arch]) -> Arch:
        """The architecture a user names: "largest", "smallest", a dict, inline JSON
        ('{"gene": value, ...}'), or a JSON file holding one (or {"arch": {...}}, as the searches
        write). The one parser of every command's ``--arch``; the result is validated."""
        if isinstance(spec, dict):
            arch = spec
        elif spec in ("largest", "smallest"):
            return self.largest() if spec == "largest" else self.smallest()
        elif isinstance(spec, str) and spec.lstrip().startswith("{"):
            arch = json.loads(spec)
        else:
            if not os.path.isfile(spec):
                raise ValueError(f"architecture {str(spec)!r} is none of largest, smallest, "
                                 "inline JSON or a JSON file")
            with open(spec) as f:
                arch = json.load(f)
        if isinstance(arch.get("arch"), dict):   # a search result
            arch = arch["arch"]
        return self.validate(arch)

    def sample(self, rng: random.Random) -> Arch:
        return self.canonical({name: rng.choice(c) for name, c in self.genes.items()})

    def largest(self) -> Arch:
        return self.canonical({name: max(c) for name, c in self.genes.items()})

    def smallest(self) -> Arch:
        return self.canonical({name: min(c) for name, c in self.genes.items()})

    def mutate(self, arch: Arch, prob: float, rng: random.Random) -> Arch:
        return self.canonical({name: rng.choice(c) if rng.random() < prob else arch[name]
                               for name, c in self.genes.items()})

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        return self.canonical({name: (a if rng.random() < 0.5 else b)[name]
                               for name in self.genes})


@dataclass
class EvolutionConfig:
    iterations: int = 30
    population: int = 125
    parents: int = 25
    mutations: int = 50
    mutation_prob: float = 0.3
    crossovers: int = 50
    seed: int = 0
    max_tries: int = 10000  # draws allowed per child before the constraint is deemed unsatisfiable

    def __post_init__(self):
        if not 1 <= self.parents <= self.population:
            raise ValueError(f"EvolutionConfig: parents must be in [1, population="
                             f"{self.population}], got {self.parents}")
        if self.parents + self.mutations + self.crossovers < 1 or min(
                self.iterations, self.mutations, self.crossovers) < 0:
            raise ValueError("EvolutionConfig: iterations, mutations and crossovers must be >= 0")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise ValueError(f"EvolutionConfig: mutation_prob must be in [0, 1], "
                             f"got {self.mutation_prob}")


@dataclass
class SearchResult:
    best: Arch
    best_fitness: float
    history: List[float] = field(default_factory=list)  # best fitness after each iteration
    evaluated: int = 0  # distinct architectures whose fitness was computed
    population: List[Tuple[float, Arch]] = field(default_factory=list)  # final, fittest first


def evolutionary_search(space: GeneSpace, fitness: Callable[[Arch], float],
                        constraint: Optional[Callable[[Arch], bool]] = None,
                        config: Optional[EvolutionConfig] = None,
                        on_iteration: Optional[Callable[[int, float, Arch], None]] = None
                        ) -> SearchResult:
    """Minimises ``fitness`` over the architectures of ``space`` that satisfy ``constraint``."""
    config = config or EvolutionConfig()
    rng = random.Random(config.seed)
    constraint = constraint or (lambda arch: True)
    scores: Dict[Tuple, float] = {}

    def draw(make: Callable[[], Arch], what: str) -> Arch:
        for _ in range(config.max_tries):
            arch = make()
            if constraint(arch):
                return arch
        raise RuntimeError(f"evolutionary_search: no {what} satisfied the constraint in "
                           f"{config.max_tries} draws; loosen the constraint")

    def score(arch: Arch) -> float:
        key = space.key(arch)
        if key not in scores:
            scores[key] = float(fitness(arch))
        return scores[key]

    population = [draw(lambda: space.sample(rng), "random architecture")
                  for _ in range(config.population)]
    history: List[float] = []
    ranked: List[Tuple[float, Arch]] = []
    for iteration in range(max(config.iterations, 1)):
        ranked = sorted(((score(a), a) for a in population), key=lambda sa: sa[0])
        history.append(ranked[0][0])
        if on_iteration is not None:
            on_iteration(iteration, ranked[0][0], ranked[0][1])
        if iteration == config.iterations - 1 or config.iterations == 0:
            break
        parents = [a for _, a in ranked[:config.parents]]
        children = [draw(lambda: space.mutate(rng.choice(parents), config.mutation_prob, rng),
                         "mutation") for _ in range(config.mutations)]
        children += [draw(lambda: space.crossover(rng.choice(parents), rng.choice(parents), rng),
                          "crossover") for _ in range(config.crossovers)]
        population = parents + children
    return SearchResult(best=ranked[0][1], best_fitness=ranked[0][0], history=history,
                        evaluated=len(scores), population=ranked)
