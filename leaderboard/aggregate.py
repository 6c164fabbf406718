"""From results.json files to leaderboard rows: seeds averaged, attacks' worst case, guards applied.

- An **observation** is one branch of one results.json: the defended model, or the undefended
  reference a defended run also attacks (it counts as a run of the ``none`` defence).
- A **cell** groups observations by (model + fingerprint, defence + params hash, attack + params
  hash, evaluation setup) across seeds. Its harm is the mean over seeds with a Student-t 95%
  interval over seeds (mean ± t(0.975, n-1)·s/√n, unclipped); with a single seed it is that run's
  own within-run 95% interval over prompts (normal approximation), and says so.
- A **defence row** groups a defence's cells over the attack grid it was run on: worst case (the
  cell with the highest post-attack harm) and mean over attacks. Rows are ranked within (model,
  setup); flagged rows (capability drop, fluency guard) sort below unflagged ones and get no rank.

Runs whose evaluation differs (prompt set, prompt count, judges, generation settings) are not
comparable, so the setup hash is part of every key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.results_schema import load_results
from harness.stats import t_interval
from leaderboard import guards

ONE_SEED = "1 seed: the run's own 95% CI over prompts (normal approximation)"
SEEDS = "{n} seeds: Student-t 95% CI over seeds"


@dataclass
class Observation:
    path: Path  # the results.json
    branch: str
    results: dict[str, Any]
    model: str
    fingerprint: str
    defence: str
    defence_preset: str | None
    defence_params: dict[str, Any]
    attack: str
    attack_preset: str | None
    attack_params: dict[str, Any]
    threat_model: str
    setup: str
    seed: int
    post: dict[str, Any]  # the summary's primary-judge harm numbers
    pre: dict[str, Any] | None
    capability: float | None
    capability_delta: float | None
    fluency: bool | None

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def records(self, phase: str = "post_attack") -> Path | None:
        """The harmfulness generations of this branch, if the file sits inside the run directory."""
        relative = self.results["results"][self.branch][phase].get("harmfulness", {}).get("records")
        if not relative:
            return None
        path = (self.run_dir / relative).resolve()
        return path if path.is_relative_to(self.run_dir.resolve()) and path.is_file() else None


@dataclass
class Estimate:
    mean: float
    low: float | None
    high: float | None
    method: str
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)


def harm_estimate(blocks: list[dict[str, Any]]) -> Estimate:
    """Mean harm over seeds with its interval (see the module docstring for which one)."""
    values = [b["mean"] for b in blocks]
    if len(blocks) == 1:
        low, high = blocks[0]["mean_ci95"]
        return Estimate(values[0], low, high, ONE_SEED, values)
    mean, low, high = t_interval(values)
    return Estimate(mean, low, high, SEEDS.format(n=len(values)), values)


def plain_estimate(values: list[float | None]) -> Estimate | None:
    """Mean over seeds with a t-interval, or no interval for one seed; None if never measured."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    if len(known) == 1:
        return Estimate(known[0], None, None, "1 seed: no interval", known)
    mean, low, high = t_interval(known)
    return Estimate(mean, low, high, SEEDS.format(n=len(known)), known)


def label(name: str, preset: str | None) -> str:
    return f"{name}@{preset}" if preset else name


@dataclass
class Cell:
    runs: list[Observation]
    post: Estimate
    pre: Estimate | None
    capability: Estimate | None
    capability_delta: Estimate | None
    fluency: bool | None
    flags: list[str]

    @property
    def first(self) -> Observation:
        return self.runs[0]

    @property
    def attack_label(self) -> str:
        return label(self.first.attack, self.first.attack_preset)

    @property
    def attack_hash(self) -> str:
        return stable_hash(self.first.attack_params, 8)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def strength(self) -> float | None:
        """lr × samples × epochs: the attack's order of strength on plots (None if not an SFT attack)."""
        p = self.first.attack_params
        if isinstance(p.get("lr"), (int, float)) and isinstance(p.get("num_samples"), (int, float)):
            return p["lr"] * p["num_samples"] * p.get("epochs", 1)
        return None


@dataclass
class DefenceRow:
    cells: list[Cell]
    worst: Cell
    mean_post: float
    pre: float | None
    capability_delta: float | None
    fluency: bool | None
    flags: list[str]
    rank: int | None = None

    @property
    def first(self) -> Observation:
        return self.cells[0].first

    @property
    def defence(self) -> str:
        return self.first.defence

    @property
    def defence_label(self) -> str:
        return label(self.first.defence, self.first.defence_preset)

    @property
    def defence_hash(self) -> str:
        return stable_hash(self.first.defence_params, 8)

    @property
    def group(self) -> tuple[str, str, str]:
        """What rows are ranked within: model, its fingerprint and the evaluation setup."""
        return self.first.model, self.first.fingerprint, self.first.setup

    @property
    def seeds(self) -> list[int]:
        return sorted({s for c in self.cells for s in c.seeds})


@dataclass
class Board:
    rows: list[DefenceRow]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    capability_threshold: float = guards.DEFAULT_CAPABILITY_DROP
    sort: str = "worst"

    @property
    def cells(self) -> list[Cell]:
        return [c for r in self.rows for c in r.cells]


# -- reading ---------------------------------------------------------------------------------------
def find_results(paths: Iterable[Path]) -> list[Path]:
    """Every results.json under the given files/directories (hidden and records dirs skipped)."""
    found = []
    for root in paths:
        root = Path(root)
        if root.is_file():
            found.append(root)
            continue
        if not root.is_dir():
            raise HarnessError(f"{root}: no such file or directory.")
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "records")
            if "results.json" in files:
                found.append(Path(directory) / "results.json")
    return sorted(dict.fromkeys(p.resolve() for p in found))


def setup_hash(results: dict[str, Any], branch: str) -> str:
    """What makes two harm numbers comparable: prompts, their format, judges, generation (not the
    backend, batch size or fluency settings, which do not change the scores)."""
    params = dict(results["results"][branch]["post_attack"]["harmfulness"]["params"])
    for noise in ("backend", "backend_params", "fluency"):
        params.pop(noise, None)
    generation = {k: v for k, v in params.get("generation", {}).items() if k != "batch_size"}
    return stable_hash({"harmfulness": {**params, "generation": generation},
                        "eval_prompts": results["data"]["eval_prompts"],
                        "prompt_format": results["data"]["prompt_format"]}, 8)


def observations(results: dict[str, Any], path: Path) -> list[Observation]:
    """One observation per branch that measured post-attack harm."""
    out = []
    summary = results["summary"]["branches"]
    reference = summary.get("undefended")
    for branch, content in results["results"].items():
        post = summary[branch]["post_attack"]["harmfulness"]
        if post is None:
            continue
        if branch == "defended":
            defence = results["defence"]
            name, preset, params = defence["name"], defence.get("preset"), defence["params"]
        else:  # the undefended reference: a run of the `none` defence under the same attack
            name, preset = content["defence"], None
            params = results["stages"].get(f"{branch} defend", {}).get("params", {})
        mine = guards.capability(summary[branch]["pre_attack"])
        theirs = guards.capability(reference["pre_attack"]) if reference and branch == "defended" else None
        out.append(Observation(
            path=path, branch=branch, results=results,
            model=results["model"]["ref"], fingerprint=results["model"]["fingerprint"],
            defence=name, defence_preset=preset, defence_params=params,
            attack=results["attack"]["name"], attack_preset=results["attack"].get("preset"),
            attack_params=results["attack"]["params"], threat_model=results["attack"]["threat_model"],
            setup=setup_hash(results, branch), seed=results["seed"],
            post=post, pre=summary[branch]["pre_attack"]["harmfulness"],
            capability=mine,
            capability_delta=mine - theirs if mine is not None and theirs is not None else None,
            fluency=guards.fluency_fired(content),
        ))
    return out


def load(paths: Iterable[Path]) -> tuple[list[Observation], list[tuple[str, str]]]:
    """Observations from every readable results.json; unreadable ones are listed with the reason."""
    found, skipped = [], []
    for path in find_results(paths):
        try:
            results = load_results(path)
        except HarnessError as exc:
            skipped.append((str(path), str(exc)))
            continue
        obs = observations(results, path)
        if not obs:
            skipped.append((str(path), "no post-attack harmfulness was measured"))
        found += obs
    return found, skipped


# -- aggregating -----------------------------------------------------------------------------------
def _cell_key(o: Observation) -> tuple:
    return (o.model, o.fingerprint, o.defence, stable_hash(o.defence_params), o.attack,
            stable_hash(o.attack_params), o.setup)


def _latest_per_seed(runs: list[Observation]) -> list[Observation]:
    """One observation per seed: a direct run of the defence beats the undefended reference branch
    of another defence's run (which repeats it), then the newest file wins."""
    by_seed: dict[int, Observation] = {}
    for o in sorted(runs, key=lambda o: (o.branch == "defended", o.results["created"], str(o.path))):
        by_seed[o.seed] = o
    return [by_seed[s] for s in sorted(by_seed)]


def make_cell(runs: list[Observation], threshold: float) -> Cell:
    runs = _latest_per_seed(runs)
    pres = [o.pre for o in runs if o.pre is not None]
    delta = plain_estimate([o.capability_delta for o in runs])
    measured = [o.fluency for o in runs if o.fluency is not None]
    fluency = any(measured) if measured else None
    return Cell(
        runs=runs,
        post=harm_estimate([o.post for o in runs]),
        pre=harm_estimate(pres) if len(pres) == len(runs) else None,
        capability=plain_estimate([o.capability for o in runs]),
        capability_delta=delta,
        fluency=fluency,
        flags=guards.flags(delta.mean if delta else None, fluency, threshold),
    )


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def make_row(cells: list[Cell]) -> DefenceRow:
    cells = sorted(cells, key=lambda c: (c.strength is None, c.strength or 0, c.attack_label, c.attack_hash))
    measured = [c.fluency for c in cells if c.fluency is not None]
    return DefenceRow(
        cells=cells,
        worst=max(cells, key=lambda c: c.post.mean),
        mean_post=sum(c.post.mean for c in cells) / len(cells),
        pre=_mean([c.pre.mean if c.pre else None for c in cells]),
        capability_delta=_mean([c.capability_delta.mean if c.capability_delta else None for c in cells]),
        fluency=any(measured) if measured else None,
        flags=sorted({f for c in cells for f in c.flags}),
    )


# name: (key on a row, lower is better)
SORTS: dict[str, tuple[Callable[[DefenceRow], float | None], bool]] = {
    "worst": (lambda r: r.worst.post.mean, True),
    "mean": (lambda r: r.mean_post, True),
    "pre": (lambda r: r.pre, True),
    "capability": (lambda r: r.capability_delta, False),
}


def rank(rows: list[DefenceRow], sort: str) -> list[DefenceRow]:
    """Order rows within each (model, setup) group: unflagged first by the metric, then flagged.
    Only unflagged rows get a rank number, so a flagged row can never be first."""
    if sort not in SORTS:
        raise HarnessError(f"Unknown sort {sort!r}; choose one of {', '.join(SORTS)}.")
    metric, ascending = SORTS[sort]

    def key(row: DefenceRow) -> tuple:
        value = metric(row)
        missing = value is None
        value = 0.0 if missing else (value if ascending else -value)
        return (row.group, bool(row.flags), missing, value, row.defence, row.defence_hash)

    ordered = sorted(rows, key=key)
    position: dict[tuple, int] = {}
    for row in ordered:
        if row.flags:
            row.rank = None
        else:
            position[row.group] = position.get(row.group, 0) + 1
            row.rank = position[row.group]
    return ordered


def aggregate(observations: list[Observation], capability_threshold: float = guards.DEFAULT_CAPABILITY_DROP,
              sort: str = "worst", models: list[str] | None = None) -> Board:
    """Cells from observations, rows from cells, ranked."""
    chosen = [o for o in observations if not models or o.model in models]
    groups: dict[tuple, list[Observation]] = {}
    for o in chosen:
        groups.setdefault(_cell_key(o), []).append(o)
    cells = [make_cell(runs, capability_threshold) for runs in groups.values()]
    by_defence: dict[tuple, list[Cell]] = {}
    for cell in cells:
        o = cell.first
        key = (o.model, o.fingerprint, o.defence, stable_hash(o.defence_params), o.setup)
        by_defence.setdefault(key, []).append(cell)
    rows = rank([make_row(c) for c in by_defence.values()], sort)
    return Board(rows=rows, capability_threshold=capability_threshold, sort=sort)


def build_board(paths: Iterable[Path], capability_threshold: float = guards.DEFAULT_CAPABILITY_DROP,
                sort: str = "worst", models: list[str] | None = None) -> Board:
    """Read every results.json under ``paths`` and aggregate; an error if none could be used."""
    paths = list(paths)
    found, skipped = load(paths)
    board = aggregate(found, capability_threshold, sort, models)
    board.skipped = skipped
    if not board.rows:
        why = f" ({len(skipped)} unreadable: {skipped[0][1]})" if skipped else ""
        which = f" for model(s) {', '.join(models)}" if models else ""
        raise HarnessError(f"No usable results.json under {', '.join(map(str, paths))}{which}{why}.")
    return board
