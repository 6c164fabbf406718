"""Run a search: Optuna proposes, the harness runs each trial as an ordinary cached run, results go back.

The study lives in ``<output_dir>/searches/<name>/study.db`` (Optuna's RDB storage on SQLite), so a
search killed at any point resumes where it stopped: finished trials are kept and never re-run; a
trial that was running when the process died is marked interrupted and its params are run again
first (its finished stages come from the cache). One process drives a search at a time (a lock file);
trials can run several at once on the Ray executor (``parallel``), TPE then proposes with its
constant-liar strategy.

Determinism: the sampler is re-created for every trial with a seed derived from the search's seed and
the trial's number, so the same search file proposes the same trials in the same order whatever ran
before in this process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from harness.errors import ConfigError, HarnessError
from harness.files.atomic import write_json
from harness.files.hashing import stable_hash
from harness.run.names import safe_part
from harness.search.objective import score
from harness.search.report import build_report, print_report
from harness.search.space import Choices, SearchSpec, field_kind, start_values, trial_config
from harness.terminal import plain

PRIMITIVE = (bool, int, float, str, type(None))
BIG = 1e30  # stands for an infinite constraint violation (Optuna stores attributes as JSON)


def search_dir(spec: SearchSpec) -> Path:
    """``<output_dir>/searches/<name>__<defence>``: one search file, run against several defences, keeps one
    study per defence."""
    return Path(spec.base.get("output_dir", "runs")) / "searches" / f"{spec.name}__{safe_part(spec.defence['name'])}"


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """One driver per search: a second `harness search` of the same name fails instead of sharing trials."""
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HarnessError(f"Another process is running the search in {path.parent}; wait for it or give "
                               "this search another name.") from None
        yield


def make_sampler(spec: SearchSpec, number: int) -> Any:
    import optuna

    seed = int(stable_hash({"seed": spec.sampler.seed, "trial": number}, 8), 16)
    if spec.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.startup_trials)


def _category(value: Any) -> Any:
    """Optuna's categories are primitives; a list (LoRA targets) is kept as its JSON text."""
    return value if isinstance(value, PRIMITIVE) else json.dumps(value, sort_keys=True)


def suggest(trial: Any, spec: SearchSpec) -> tuple[str, dict[str, Any]]:
    """The attack kind and its searched params for one trial (define-by-run: each kind its own params)."""
    from harness.search.space import _params_model

    attack = trial.suggest_categorical("attack", spec.attack_names)
    fields = _params_model(attack).model_fields
    values: dict[str, Any] = {}
    for name, dim in spec.attacks[attack].search.items():
        key = f"{attack}.{name}"
        if isinstance(dim, Choices):
            picked = trial.suggest_categorical(key, [_category(v) for v in dim.choices])
            values[name] = next(v for v in dim.choices if _category(v) == picked)
        elif field_kind(fields[name].annotation) == "int":
            values[name] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            values[name] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return attack, values


def optuna_params(attack: str, values: dict[str, Any]) -> dict[str, Any]:
    return {"attack": attack, **{f"{attack}.{k}": _category(v) for k, v in values.items()}}


def open_study(spec: SearchSpec, directory: Path, console: Console) -> Any:
    """Create the study, or reopen it; a study of another search space in the same place is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(directory / 'study.db').resolve()}")
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(spec, 0))
    identity = study.user_attrs.get("space")
    if identity is None:
        study.set_user_attr("space", spec.identity())
        for index, start in enumerate(spec.start_with):
            attack, values = start_values(spec, start, f"start_with.{index}")
            study.enqueue_trial(optuna_params(attack, values), user_attrs={"start_with": index})
    elif identity != spec.identity():
        raise ConfigError(f"{directory} holds search {spec.name!r} of another search space (base, defence, seed, "
                          "attacks, objective, sampler or start_with changed). Give this search another name, or "
                          "delete that directory to start over.")
    else:
        kept = len(counted(study))
        console.print(f"Resuming search [bold]{plain(spec.name)}[/]: {kept} finished trial(s) kept.")
    recover_interrupted(study, console)
    return study


def recover_interrupted(study: Any, console: Console) -> None:
    """Trials left running by a killed process (this process holds the lock, so none is really running):
    mark them interrupted (not counted) and run their params again next."""
    from optuna.trial import TrialState

    storage = study._storage  # noqa: SLF001 - Optuna's documented storage API, reached through the study
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)  # noqa: SLF001
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # noqa: SLF001
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        console.print(f"[yellow]Trial {trial.number} was interrupted[/]; it runs again (cached stages reused).")


def counted(study: Any) -> list[Any]:
    """Trials that spent budget: finished ones and failed ones (interrupted ones are re-run, not counted)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]


def spent(study: Any) -> tuple[int, int]:
    done = counted(study)
    return len(done), sum(int(t.user_attrs.get("train_tokens", 0)) for t in done)


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN (a model so broken its perplexity overflowed): recorded as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _finish(study: Any, spec: SearchSpec, trial: Any, outcome: dict[str, Any], directory: Path) -> None:
    """Score a finished run and tell Optuna; a run that failed is a failed trial (it counts)."""
    from optuna.trial import TrialState

    from harness.results.schema import load_results

    if outcome["status"] != "ok":
        trial.set_user_attr("error", str(outcome["error"])[-2000:])
        study.tell(trial, state=TrialState.FAIL)
        return
    run_dir = Path(outcome["run_dir"])
    results = load_results(run_dir / "results.json")
    try:
        scored = score(results, spec.objective, spec.constraints)
    except HarnessError:  # a constraint naming a missing metric: a config problem, not this trial's fault
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        raise
    trial.set_user_attr("run_dir", os.path.relpath(run_dir.resolve(), directory.resolve()))
    trial.set_user_attr("harm", scored["harm"])
    trial.set_user_attr("feasible", scored["feasible"])
    trial.set_user_attr("constraints", [{k: _finite(v) for k, v in {**c, "violation": min(c["violation"], BIG)}.items()}
                                        for c in scored["constraints"]])
    for check in scored["constraints"]:  # constrained TPE: ≤ 0 is feasible
        trial.set_constraint(check["constraint"], min(check["violation"], BIG))
    trial.set_user_attr("train_tokens", scored["train_tokens"])
    trial.set_user_attr("wall_seconds", results["compute"]["wall_seconds_this_run"])
    study.tell(trial, scored["harm"]["value"])


def run_search(spec: SearchSpec, console: Console, executor: str | None = None) -> Path:
    """Run the search to its budget (resuming a stored one), write search.json, print the report."""
    from harness.run.executors import run_local, run_ray

    directory = search_dir(spec)
    directory.mkdir(parents=True, exist_ok=True)
    trials_dir = directory / "trials"
    chosen = executor or spec.executor
    with exclusive(directory / "search.lock"), _ray_session(chosen, spec):
        study = open_study(spec, directory, console)
        console.print(f"Search [bold]{plain(spec.name)}[/] against {plain(spec.defence['name'])}: budget "
                      f"{plain(spec.budget.describe())}, sampler {spec.sampler.name} (seed {spec.sampler.seed}), "
                      f"executor {chosen}")
        while True:
            trials_done, tokens_done = spent(study)
            if trials_done >= spec.budget.trials:
                break
            if spec.budget.train_tokens is not None and tokens_done >= spec.budget.train_tokens:
                console.print(f"Training-token budget spent ({tokens_done:,} of {spec.budget.train_tokens:,}).")
                break
            batch = []
            for _ in range(min(spec.parallel if chosen == "ray" else 1, spec.budget.trials - trials_done)):
                trial = study.ask()
                study.sampler = make_sampler(spec, trial.number)  # proposals depend on (seed, trial), not history
                attack, values = suggest(trial, spec)
                config = trial_config(spec, attack, values, trials_dir)
                trial.set_user_attr("attack", attack)
                trial.set_user_attr("values", values)
                trial.set_user_attr("config", config.model_dump(mode="json"))
                batch.append((trial, config))
                console.rule(f"trial {trial.number}: {plain(attack)} {plain(json.dumps(values))}")

            def done(index: int, outcome: dict[str, Any]) -> None:
                _finish(study, spec, batch[index][0], outcome, directory)
                write_json(directory / "search.json", build_report(spec, study, directory))

            configs = [c.model_dump(mode="json") for _, c in batch]
            if chosen == "ray":
                run_ray(configs, spec.threads_per_trial, console, done, spec.ray.address,
                        spec.ray.num_cpus_per_cell, spec.ray.num_gpus_per_cell)
            else:
                run_local(configs, spec.threads_per_trial, console, done)
        report = build_report(spec, study, directory)
        write_json(directory / "search.json", report)
    print_report(report, console)
    console.print(f"Search results: [bold]{plain(directory / 'search.json')}[/] (trials in {plain(trials_dir)})")
    return directory


@contextlib.contextmanager
def _ray_session(executor: str, spec: SearchSpec) -> Iterator[None]:
    """One Ray instance for the whole search (run_ray would start and stop one per batch)."""
    if executor != "ray":
        yield
        return
    try:
        import ray
    except ImportError:
        raise HarnessError("The ray executor needs Ray: pip install 'harmful-ft-harness[ray]'.") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=spec.ray.address or "local", include_dashboard=False, log_to_driver=False)  # see run_ray
    try:
        yield
    finally:
        if started:
            ray.shutdown()
