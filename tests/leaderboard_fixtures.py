"""Real tiny-llama results for the leaderboard tests, built once per session, plus helpers that
copy a run and set chosen numbers in it (the tiny random model scores 1.0 everywhere, so the
aggregation formulas need controlled values to be checked against)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable

GRID_SETS = [
    "attack.num_samples=8",
    "attack.max_length=48",
    "evaluate.harmfulness.num_prompts=8",
    "evaluate.harmfulness.generation.max_new_tokens=8",
    "evaluate.harmfulness.judges=[{name: refusal-keywords}]",  # the trained default judge costs minutes
    "evaluate.harmfulness.fluency.reference_perplexity=false",  # one model load less per evaluation
]
DEFENCES = {"none": [], "repnoise": ["defence.num_pairs=8", "defence.max_length=48"]}
ATTACKS = ("full-ft", "lora")
SEEDS = (1, 2)

_built: dict[str, Path] = {}


def grid(tmp_path_factory) -> Path:
    """Runs directory of none/repnoise × full-ft/lora × seeds 1, 2 on tiny-llama (built once)."""
    if "runs" not in _built:
        import torch
        from rich.console import Console

        from harness.run.config import build_config
        from harness.run.runner import execute

        root = tmp_path_factory.mktemp("leaderboard-grid")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for defence, extra in DEFENCES.items():
                for attack in ATTACKS:
                    for seed in SEEDS:
                        flags = {"model": {"ref": "tiny-llama"}, "defence": {"name": defence},
                                 "attack": {"name": attack}, "seed": seed,
                                 "cache_dir": str(root / "cache"), "output_dir": str(root / "runs")}
                        execute(build_config(flags=flags, sets=[*GRID_SETS, *extra]), Console(quiet=True))
        finally:
            torch.set_num_threads(threads)
        _built["runs"] = root / "runs"
        _built["cache"] = root / "cache"
    return _built["runs"]


def grid_cache() -> Path:
    return _built["cache"]


def results_files(runs: Path) -> list[Path]:
    return sorted(runs.glob("*/results.json"))


def find_run(runs: Path, defence: str, attack: str, seed: int) -> Path:
    for path in results_files(runs):
        r = json.loads(path.read_text())
        if (r["defence"]["name"], r["attack"]["name"], r["seed"]) == (defence, attack, seed):
            return path
    raise AssertionError(f"no run {defence}/{attack}/{seed} under {runs}")


def refresh(obj: dict[str, Any]) -> dict[str, Any]:
    """Recompute the derived v2 blocks after editing ``results`` (so the file stays valid)."""
    from harness.results.summary import derived_blocks

    obj.update(derived_blocks(obj))
    return obj


def copy_run(source: Path, target_root: Path, mutate: Callable[[dict[str, Any]], None] | None = None,
             name: str | None = None) -> Path:
    """Copy a run directory (results + records) under ``target_root``, editing its results."""
    target = target_root / (name or source.parent.name)
    shutil.copytree(source.parent, target)
    obj = json.loads((target / "results.json").read_text())
    if mutate:
        mutate(obj)
        refresh(obj)
    (target / "results.json").write_text(json.dumps(obj, indent=2))
    return target / "results.json"


def set_harm(obj: dict[str, Any], mean: float, branch: str = "defended", phase: str = "post_attack",
             ci: tuple[float, float] | None = None) -> None:
    metrics = obj["results"][branch][phase]["harmfulness"]["metrics"]
    scores = metrics[metrics["primary_judge"]]
    scores["mean"] = mean
    scores["mean_ci95"] = list(ci) if ci else [max(0.0, mean - 0.1), min(1.0, mean + 0.1)]


def add_evaluation(obj: dict[str, Any], name: str, metrics: dict[str, Any], branch: str = "defended",
                   phase: str = "pre_attack") -> None:
    """An extra evaluator entry (capability, fluency) pointing at an existing records file."""
    records = obj["results"][branch][phase]["harmfulness"]["records"]
    obj["results"][branch][phase][name] = {"key": "test", "params": {}, "metrics": copy.deepcopy(metrics),
                                           "info": {}, "records": records}


def rename_defence(obj: dict[str, Any], name: str) -> None:
    obj["defence"]["name"] = name
    obj["config"]["defence"]["name"] = name
    obj["results"]["defended"]["defence"] = name


# Fluency measurements that the harness's rule (evaluators.fluency.fluency_level) reads as each level;
# "repetitive" is RepNoise's measured set (distinct-2 0.39, reference perplexity 3).
FLUENCY_MEASUREMENTS = {
    "ok": {"unusable_rate": 0.0, "distinct_2": 0.9, "reference_perplexity_median": 3.0},
    "repetitive": {"unusable_rate": 0.0, "distinct_2": 0.39, "reference_perplexity_median": 3.0},
    "degenerate": {"unusable_rate": 0.9, "distinct_2": 0.1, "reference_perplexity_median": 3.0},
}


def set_fluency(obj: dict[str, Any], degenerate: bool | str | None, branch: str | None = None) -> None:
    """Set (or, with None, remove) the fluency of the harmfulness evaluations (of one branch): True/False
    or a level name. The board judges the measurements, so they are set to ones that give the verdict."""
    level = {True: "degenerate", False: "ok"}.get(degenerate, degenerate)  # type: ignore[arg-type]
    for name, content in obj["results"].items():
        if branch and name != branch:
            continue
        for phase in ("pre_attack", "post_attack"):
            metrics = content[phase]["harmfulness"]["metrics"]
            if degenerate is None:
                metrics.pop("fluency", None)
            else:
                block = metrics.setdefault("fluency", {})
                block.update(FLUENCY_MEASUREMENTS[level], degenerate=level == "degenerate", level=level)


def controlled_board(grid_runs: Path, root: Path, harm: dict[tuple[str, str, int], float],
                     edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Copies of the grid's runs named in ``harm`` ((defence, attack, seed) -> post-attack harm of
    the defended model), fluency guard not fired, plus any further ``edit``."""
    for (defence, attack, seed), value in harm.items():
        def mutate(obj: dict[str, Any], value: float = value) -> None:
            set_harm(obj, value)
            set_fluency(obj, False)
            if edit:
                edit(obj)

        copy_run(find_run(grid_runs, defence, attack, seed), root, mutate)
    return root


# -- submission archives, built by hand (the attacker's side: no safety checks) -------------------
def unpack(path: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def repack(path: Path, files: dict[str, bytes], fix_manifest: bool = True,
           links: dict[str, str] | None = None) -> Path:
    """Write an archive by hand; with ``fix_manifest`` the checksums and id match the files."""
    import io
    import tarfile

    from leaderboard.package import MANIFEST, sha256, submission_id

    files = dict(files)
    if fix_manifest:
        manifest = json.loads(files[MANIFEST])
        manifest["files"] = {n: sha256(d) for n, d in files.items() if n != MANIFEST}
        manifest["id"] = submission_id(manifest["files"])
        files[MANIFEST] = json.dumps(manifest).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def results_member(files: dict[str, bytes], match: str = "__repnoise__lora__seed1__") -> str:
    return next(n for n in sorted(files) if match in n and n.endswith("/results.json"))


def edit_results(files: dict[str, bytes], mutate: Callable[[dict[str, Any]], None], refresh_blocks: bool = True,
                 match: str = "__repnoise__lora__seed1__") -> str:
    """Edit one results.json of an unpacked archive (and its config.json copy, to match)."""
    name = results_member(files, match)
    obj = json.loads(files[name])
    mutate(obj)
    if refresh_blocks:
        refresh(obj)
    files[name] = json.dumps(obj).encode()
    config = name.rsplit("/", 1)[0] + "/config.json"
    if config in files:
        files[config] = json.dumps(obj["config"]).encode()
    return name


def forge_scores(files: dict[str, bytes], score: float, match: str = "__repnoise__lora__seed1__",
                 branch: str = "defended", phase: str = "post_attack") -> str:
    """A consistent forgery: every answer's primary-judge score in the records set to ``score`` and
    the metrics recomputed from them, so only a re-run (verify) can tell."""
    from evaluators.harmfulness import summarise

    name = results_member(files, match)
    obj = json.loads(files[name])
    entry = obj["results"][branch][phase]["harmfulness"]
    judge = entry["metrics"]["primary_judge"]
    source = name.rsplit("/", 1)[0] + "/" + entry["records"]
    rows = [json.loads(line) for line in files[source].decode().splitlines() if line.strip()]
    for row in rows:
        row["scores"][judge] = score
    files[source] = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    entry["metrics"][judge] = {**entry["metrics"][judge], **summarise([score] * len(rows))}
    files[name] = json.dumps(refresh(obj)).encode()
    return name


# -- over-refusal and judge-error-corrected harm rates ----------------------------------------------
SECOND_JUDGE = "second-judge"


def set_over_refusal(defended: float | None, undefended: float | None) -> Callable[[dict[str, Any]], None]:
    """An edit giving the defended (and, in a defended run, the undefended) model an over-refusal
    headline before the attack; None leaves that branch unmeasured."""
    def edit(obj: dict[str, Any]) -> None:
        for branch, value in (("defended", defended), ("undefended", undefended)):
            if branch in obj["results"] and value is not None:
                add_evaluation(obj, "over-refusal", {"refusal_rate": value}, branch)
    return edit


def corrected_block(rate: float, low: float, high: float) -> dict[str, Any]:
    """A ``rate_corrected`` block with chosen numbers (aggregation tests check formulas, not stats)."""
    return {"rate": rate, "rate_ci95": [low, high], "sensitivity": 0.9, "specificity": 0.8,
            "validation_counts": {"tp": 90, "fn": 10, "tn": 80, "fp": 20}, "method": "test"}


def set_corrected(obj: dict[str, Any], judges: dict[str, tuple[float, float, float]], branch: str = "defended",
                  phase: str = "post_attack") -> None:
    """Give judges of one harmfulness evaluation a corrected rate (rate, low, high). A judge the run
    did not have (:data:`SECOND_JUDGE`) is added with the primary judge's raw scores."""
    entry = obj["results"][branch][phase]["harmfulness"]
    metrics = entry["metrics"]
    for judge, (rate, low, high) in judges.items():
        if judge not in metrics:
            metrics[judge] = copy.deepcopy(metrics[metrics["primary_judge"]])
            entry["info"]["judges"][judge] = {"name": judge, "version": "1"}
        metrics[judge]["rate_corrected"] = corrected_block(rate, low, high)


def single_run(tmp_path_factory, *sets: str) -> Path:
    """One none/lora/seed-1 tiny-llama run with extra settings (a fresh directory per call)."""
    import torch
    from rich.console import Console

    from harness.run.config import build_config
    from harness.run.runner import execute

    root = tmp_path_factory.mktemp("single-run")
    flags = {"model": {"ref": "tiny-llama"}, "defence": {"name": "none"}, "attack": {"name": "lora"}, "seed": 1,
             "cache_dir": str(root / "cache"), "output_dir": str(root / "runs")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, directory = execute(build_config(flags=flags, sets=[*GRID_SETS, *sets]), Console(quiet=True))
    finally:
        torch.set_num_threads(threads)
    return directory / "results.json"


def records_of(files: dict[str, bytes], member: str, evaluator: str, branch: str = "defended",
               phase: str = "post_attack") -> tuple[str, list[dict[str, Any]]]:
    """(archive name, rows) of one evaluation's records file in an unpacked archive."""
    obj = json.loads(files[member])
    name = member.rsplit("/", 1)[0] + "/" + obj["results"][branch][phase][evaluator]["records"]
    return name, [json.loads(line) for line in files[name].decode().splitlines() if line.strip()]


def write_records(files: dict[str, bytes], name: str, rows: list[dict[str, Any]]) -> None:
    files[name] = "".join(json.dumps(r) + "\n" for r in rows).encode()
