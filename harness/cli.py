"""The `harness` command. It mirrors the Python API: every flag is a config field."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from harness.errors import ConfigError, HarnessError
from harness.probe.command import probe  # light: it imports its work when it runs
from harness.terminal import plain, print_error, state
from leaderboard.cli import leaderboard_app, submit  # light: its commands import their work lazily

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Benchmark defences against harmful fine-tuning: defend a model, attack it, measure the harm.",
)
console = Console(stderr=True)


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s",
        # markup=False: log messages carry names, paths and exception text, never Rich markup
        handlers=[RichHandler(console=console, show_path=False, show_time=False, markup=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "lm_eval", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(exc: BaseException) -> None:
    if state["debug"]:
        raise exc
    print_error(console, exc)
    raise typer.Exit(code=2)


def _os_error(exc: OSError) -> HarnessError:
    """A file-system failure no check foresaw (permissions, a full disk): a user problem, said in one
    paragraph. Other exceptions stay tracebacks: they are bugs."""
    where = f" {exc.filename}" if exc.filename else ""
    return HarnessError(f"Cannot access{where}: {exc.strerror or exc}. Check the path, its permissions and the "
                        "free space (--debug shows where it happened).")


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="show tracebacks and debug logs")) -> None:
    state["debug"] = debug
    _setup_logging(debug)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def run(
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config"),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="smollm2-135m-instruct (default), tiny-llama, a directory or a hub id"
    ),
    defence: Optional[str] = typer.Option(None, "--defence", "-d", help="defence name (harness list defences)"),
    attack: Optional[str] = typer.Option(None, "--attack", "-a", help="attack name (harness list attacks)"),
    evaluate: Optional[str] = typer.Option(
        None, "--evaluate", help="exactly these evaluators, e.g. harmfulness,capability (params from --config kept)"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    profile: Optional[str] = typer.Option(
        None, "--profile", help="cpu (default) or paper: sizes of data and evaluation"
    ),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N, mps"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, float32, bfloat16, float16"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="data directory (default: $HARNESS_DATA_DIR or ../shared/data)"
    ),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="stage cache (default: $HARNESS_CACHE_DIR or .harness-cache)"
    ),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="where run directories go (default: runs)"),
    no_reference: bool = typer.Option(
        False, "--no-reference", help="skip attacking the undefended model for comparison"
    ),
    sets: list[str] = typer.Option([], "--set", help="override any field: --set attack.lr=6e-5 (repeatable)"),
    nproc: int = typer.Option(1, "--nproc", help="processes (one per GPU) for sharded FSDP training; rank 0 writes"),
    device_memory: Optional[float] = typer.Option(
        None, "--device-memory", help="GiB per device to plan the memory estimate for (default: free now)"),
    keep_attacked_weights: bool = typer.Option(
        False, "--keep-attacked-weights", help="keep attacked models' weights after their evaluations"),
) -> None:
    """Defend, attack and evaluate one model; print the summary and write results.json."""
    from harness.run.config import build_config

    flags: dict = {}
    if model:
        flags.setdefault("model", {})["ref"] = model
    if device:
        flags.setdefault("model", {})["device"] = device
    if dtype:
        flags.setdefault("model", {})["dtype"] = dtype
    if defence:
        flags["defence"] = {"name": defence}
    if attack:
        flags["attack"] = {"name": attack}
    if seed is not None:
        flags["seed"] = seed
    if data_dir:
        flags.setdefault("data", {})["dir"] = str(data_dir)
    if cache_dir:
        flags["cache_dir"] = str(cache_dir)
    if output_dir:
        flags["output_dir"] = str(output_dir)
    if no_reference:
        flags["compare_undefended"] = False
    if device_memory is not None:
        flags.setdefault("resources", {})["device_memory_gb"] = device_memory
    if keep_attacked_weights:
        flags.setdefault("resources", {})["keep_attacked_weights"] = True
    try:
        config = build_config(config_file, flags, sets, profile, evaluate.split(",") if evaluate is not None else None)
        if nproc != 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # sharded (or started by torchrun)
            from harness.distributed.launch import run as run_sharded

            run_sharded(config, console, nproc)
            return
        from harness.run.runner import execute

        execute(config, console)
    except HarnessError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_error(exc))
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/] Finished stages are cached; run the same command again to resume.")
        raise typer.Exit(code=130)


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="sweep YAML: defences × attacks × seeds (see configs/)"),
    sets: list[str] = typer.Option(
        [], "--set", help="override a sweep field: --set base.model.ref=tiny-llama, --set seeds=[1,2]"
    ),
    executor: Optional[str] = typer.Option(None, "--executor", help="local (default) or ray; overrides the file"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and exit"),
) -> None:
    """Run every defence × attack × seed cell (sharing cached stages) and print the Table-1 matrix."""
    from harness.run.sweep import expand, load_sweep, run_sweep

    try:
        if executor not in (None, "local", "ray"):
            raise ConfigError(f"--executor {executor!r}: choose local or ray.")
        plan = load_sweep(sweep_file, sets)
        if dry_run:
            from harness.run.sweep import check_sweep_disk

            cells = expand(plan)
            for cell in cells:
                console.print(f"{plain(cell.title)}  →  {plain(cell.config.output_dir)}")
            check_sweep_disk(plan, cells, executor or plan.executor, console)  # the disk it needs (or refuses)
            return
        run_sweep(plan, console, executor)
    except HarnessError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_error(exc))
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/] Finished stages are cached; run the same sweep again to resume.")
        raise typer.Exit(code=130)


@app.command()
def search(
    search_file: Path = typer.Argument(..., help="search YAML: attack kinds, param ranges, budget (configs/search-*)"),
    defence: Optional[str] = typer.Option(None, "--defence", "-d", help="defence to attack; overrides the file"),
    trials: Optional[int] = typer.Option(None, "--trials", help="budget in trials; overrides the file"),
    train_tokens: Optional[int] = typer.Option(None, "--train-tokens", help="budget in training tokens"),
    sets: list[str] = typer.Option([], "--set", help="override a search field: --set base.model.ref=tiny-llama"),
    executor: Optional[str] = typer.Option(None, "--executor", help="local (default) or ray; overrides the file"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the search file and exit"),
) -> None:
    """Budgeted worst-case attack search (Optuna): the most harmful attack that keeps the model's fluency and
    capability within ε, every trial a cached run; resumes after a kill. Writes search.json (worst case, curve)."""
    from harness.search.space import load_search
    from harness.search.study import run_search, search_dir

    try:
        if executor not in (None, "local", "ray"):
            raise ConfigError(f"--executor {executor!r}: choose local or ray.")
        spec = load_search(search_file, sets, defence, trials, train_tokens)
        if dry_run:
            console.print(f"Search {plain(spec.name)} is valid: {len(spec.attacks)} attack kind(s), budget "
                          f"{plain(spec.budget.describe())} → {plain(search_dir(spec))}")
            return
        run_search(spec, console, executor)
    except HarnessError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_error(exc))
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/] Finished trials are stored: run the same search again to resume.")
        raise typer.Exit(code=130)


@app.command("list")
def list_plugins(
    kind: Optional[str] = typer.Argument(None, help="defences, attacks, evaluators, judges, datasets or backends"),
) -> None:
    """Show plugins with their descriptions and parameters (name: type = default)."""
    from harness.registry import HOOKS, REGISTRIES, registry_for
    from harness.run.presets import presets_of

    try:
        kinds = [registry_for(kind).kind] if kind else list(REGISTRIES)
        out = Console()
        for name in kinds:
            table = Table(title=name, show_lines=False, expand=False)
            table.add_column("name", style="bold")
            table.add_column("description")
            table.add_column("params")
            presets = presets_of(name)
            sized = "profiles" in HOOKS.get(name, {})
            if presets:
                table.add_column(f"presets ({name[:-1]} name@preset)")
            if sized:
                table.add_column("sizes for profiles")
            for plugin in registry_for(name).plugins():
                params = "\n".join(f"{p}: {t} = {d}" for p, t, d, _ in plugin.param_table())
                extra = ["\n".join(presets.get(plugin.name, {})) or "–"] if presets else []
                if sized:
                    extra.append(", ".join(plugin.hook("profiles") or {}) or "–")
                # outside plugins write these texts; defaults such as ['x'] are not markup either
                table.add_row(*map(plain, (plugin.name, plugin.description, params or "–", *extra)))
            out.print(table)
    except HarnessError as exc:
        _fail(exc)


judge_app = typer.Typer(no_args_is_help=True, help="Harmfulness judges: measure their accuracy.")
app.add_typer(judge_app, name="judge")


@judge_app.command("validate")
def judge_validate(
    judge: str = typer.Option("minilm-harm", "--judge", "-j", help="judge name (harness list judges)"),
    sets: list[str] = typer.Option([], "--set", help="judge params, e.g. --set max_train_examples=500"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="data directory"),
    cache_dir: Path = typer.Option(Path(".harness-cache"), "--cache-dir", envvar="HARNESS_CACHE_DIR",
                                   help="where trained judges and metrics live"),
    refresh: bool = typer.Option(False, "--refresh", help="recompute even if stored metrics exist"),
) -> None:
    """Accuracy, macro-F1, ROC-AUC and calibration on held-out human labels (XSTest), agreement with
    LlamaGuard2 labels, sensitivity and specificity on answers to harmful prompts, and (minilm-harm) the
    leave-one-source-out table; stored under the cache directory (judges/validation/)."""
    from harness.context import StageContext
    from harness.data.readers import DataAccess
    from harness.files.paths import resolve_data_dir
    from harness.run.config import parse_set

    try:
        params: dict = {}
        for expr in sets:
            params.update(parse_set(expr))
        directory = resolve_data_dir(data_dir)
        ctx = StageContext(seed=0, device="auto", dtype="auto", data=DataAccess(directory, "advbench", 0),
                           cache_dir=cache_dir, workdir=cache_dir, console=console)
        from evaluators.judge_validation import render_validation, run_validation

        metrics = run_validation(judge, ctx, params, refresh=refresh)
        Console().print(render_validation(metrics))
    except HarnessError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_error(exc))


from harness.resources.commands import cache_app, memory  # noqa: E402  (light: work imported when run)

app.add_typer(cache_app, name="cache")
app.command("memory")(memory)
app.add_typer(leaderboard_app, name="leaderboard")
app.command("submit")(submit)
app.command("probe")(probe)  # body in harness/probe/command.py


data_app = typer.Typer(no_args_is_help=True, help="Data preparation: pairs for defences.")
app.add_typer(data_app, name="data")


@data_app.command("refusals")
def data_refusals(
    source: str = typer.Option("beavertails-unsafe", "--from", help="QA data set of (prompt, harmful answer)"),
    out: Path = typer.Option(..., "--out", help="pairs JSONL to write; use it as defence.pairs=pairs-file:PATH"),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="model that writes the refusals"),
    judge: str = typer.Option("minilm-harm", "--judge", "-j", help="judge that must call each refusal safe"),
    num: Optional[int] = typer.Option(None, "--num", "-n", help="prompts drawn (seeded) from the source; default all"),
    max_harm: float = typer.Option(0.5, "--max-harm", help="keep a refusal only if the judge scores it below this"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    device: str = typer.Option("auto", "--device"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="data directory"),
    cache_dir: Path = typer.Option(Path(".harness-cache"), "--cache-dir", envvar="HARNESS_CACHE_DIR",
                                   help="where trained judges live"),
    seed: int = typer.Option(42, "--seed", min=0, max=2**32 - 1),
) -> None:
    """Make (prompt, harmful, refusal) pairs from a QA set that has no refusals: the model answers under
    a refusal system prompt and only answers the judge scores safe are kept (as the paper did)."""
    from harness.context import StageContext
    from harness.data.readers import DataAccess
    from harness.data.refusals import make_refusal_pairs, write_pairs
    from harness.files.paths import resolve_data_dir
    from harness.models.generation import GenerationSettings
    from harness.models.loading import load_model
    from harness.registry import judges

    try:
        access = DataAccess(resolve_data_dir(data_dir), "advbench", seed)
        records = access.qa(source, n=num)
        ctx = StageContext(seed=seed, device=device, dtype="auto", data=access, cache_dir=cache_dir,
                           workdir=cache_dir, console=console)
        plugin = judges.get(judge)
        scorer = plugin.fn(plugin.parse_params({}, f"judges.{judge}"), ctx)
        loaded = load_model(model, device=device)
        with console.status(f"Writing {len(records)} refusals with {plain(model)}…"):
            pairs, counts = make_refusal_pairs(
                loaded, records, scorer, GenerationSettings(max_new_tokens=max_new_tokens), max_harm=max_harm
            )
        write_pairs(out, pairs)
        console.print(f"{counts['kept']} of {counts['generated']} refusals kept ({counts['judged_harmful']} judged "
                      f"harmful, {counts['empty']} empty) → {plain(out)}. Use: --set "
                      f"defence.pairs=pairs-file:{plain(out.resolve())}")
    except HarnessError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_error(exc))


def entrypoint() -> None:
    try:
        app()
    except HarnessError as exc:  # raised outside a command body
        if state["debug"]:
            raise
        print_error(console, exc)
        sys.exit(2)


if __name__ == "__main__":
    entrypoint()
