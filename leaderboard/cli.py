"""`harness leaderboard …` and `harness submit`: thin commands over the leaderboard package's API."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console

from harness.errors import HarnessError
from harness.terminal import plain, print_error, state

leaderboard_app = typer.Typer(
    no_args_is_help=True,
    help="Aggregate results.json files into a ranked leaderboard; export it, build a static site, "
         "accept and verify submissions.",
)
console = Console(stderr=True)

DIRS = typer.Argument(..., help="results.json files or directories searched recursively (runs, sweeps, boards)")
SORT = typer.Option("worst", "--sort", help="worst (worst-case harm over attacks), mean, pre (harm before "
                                            "attack), capability (capability delta) or over-refusal (over-refusal "
                                            "delta)")
MODEL = typer.Option(None, "--model", help="only this model ref (repeatable)")
THRESHOLD = typer.Option(0.05, "--capability-drop", help="flag defences whose capability headline is more than "
                                                         "this (absolute) below the undefended model")
MARGIN = typer.Option(0.10, "--over-refusal-margin", help="flag defences whose refusal rate on benign prompts "
                                                         "(over-refusal, before the attack) is more than this "
                                                         "(absolute) above the undefended model's")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """User errors as one red paragraph and exit code 2, as in the rest of the CLI (--debug: traceback)."""
    try:
        yield
    except (HarnessError, OSError) as exc:  # OSError: a path the user gave cannot be read or written
        if state["debug"]:
            raise
        print_error(console, exc)
        raise typer.Exit(code=2) from None


def _board(dirs: list[Path], sort: str, model: Optional[list[str]], threshold: float, margin: float):
    from leaderboard.aggregate import build_board

    board = build_board(dirs, threshold, sort, model or None, margin)
    for path, reason in board.skipped:
        console.print(f"[yellow]Skipped[/] {plain(path)}: {plain(reason)}")
    return board


@leaderboard_app.command("show")
def show(dirs: list[Path] = DIRS, sort: str = SORT, model: Optional[list[str]] = MODEL,
         threshold: float = THRESHOLD, margin: float = MARGIN) -> None:
    """Print the ranking: worst-case and mean harm over attacks, seeds averaged, guards applied."""
    from leaderboard.tables import notes, terminal_tables

    with _user_errors():
        board = _board(dirs, sort, model, threshold, margin)
        out = Console()
        for table in terminal_tables(board):
            out.print(table)
        for line in notes(board):
            out.print(f"[dim]{plain(line)}[/]")


@leaderboard_app.command("export")
def export(dirs: list[Path] = DIRS,
           fmt: str = typer.Option("md", "--format", "-f", help="md, csv or json"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="file to write (default: stdout)"),
           sort: str = SORT, model: Optional[list[str]] = MODEL, threshold: float = THRESHOLD,
           margin: float = MARGIN) -> None:
    """Write the ranking as Markdown, CSV or JSON (JSON also holds every cell and per-seed value)."""
    from harness.files.atomic import write_text
    from leaderboard.tables import render

    with _user_errors():
        text = render(_board(dirs, sort, model, threshold, margin), fmt)
        if out:
            write_text(out, text)
            console.print(f"Wrote {plain(out)}")
        else:
            typer.echo(text, nl=False)


@leaderboard_app.command("build")
def build(dirs: list[Path] = DIRS,
          out: Path = typer.Option(..., "--out", "-o", help="site directory: new, empty, or a site built before "
                                                            "(it is replaced)"),
          sort: str = SORT, model: Optional[list[str]] = MODEL, threshold: float = THRESHOLD,
          margin: float = MARGIN) -> None:
    """Build the static HTML site: ranking, a page per defence, plots. Open index.html; no server needed."""
    from leaderboard.search_page import find_searches
    from leaderboard.site import build_site

    with _user_errors():
        searches, unreadable = find_searches(dirs)  # budgeted worst-case searches, shown beside the grid
        for path, reason in unreadable:
            console.print(f"[yellow]Skipped search[/] {plain(path)}: {plain(reason)}")
        site = build_site(_board(dirs, sort, model, threshold, margin), out, searches)
        console.print(f"Site: [bold]{plain(site / 'index.html')}[/]")


@leaderboard_app.command("add")
def add(file: Path = typer.Argument(..., help="a submission file made by `harness submit`"),
        board: Path = typer.Option(..., "--board", "-b", help="leaderboard directory")) -> None:
    """Check a submission (schema, checksums, safety, plausibility) and add it to a board."""
    from leaderboard import intake

    with _user_errors():
        submission, target, added = intake.add(file, board)
        defences = ", ".join(d["name"] for d in submission.manifest["defences"])
        runs = len(submission.results)
        if added:
            console.print(f"[green]Added[/] submission {plain(submission.id)} ({runs} run(s); defences: "
                          f"{plain(defences)}) to {plain(target)}")
        else:
            console.print(f"Submission {plain(submission.id)} is already on the board ({plain(target)}); "
                          "nothing changed.")


@leaderboard_app.command("verify")
def verify(file: Path = typer.Argument(..., help="a submission file, a results.json or a run directory"),
           cell: int = typer.Option(0, "--cell", "-n", help="which run of the submission (0-based, as listed in "
                                                            "its manifest)"),
           tolerance: float = typer.Option(0.02, "--tolerance", help="largest absolute difference per metric"),
           cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="stage cache for the re-run "
                                                                              "(default: a fresh temporary one)"),
           output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="where the re-run's run directory "
                                                                                "goes (default: temporary)"),
           data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="data directory (default: "
                                                                            "$HARNESS_DATA_DIR or ../shared/data)"),
           device: Optional[str] = typer.Option(None, "--device", help="override the recorded device"),
           allow_model: Optional[list[str]] = typer.Option(None, "--allow-model", help="also load this local "
                                                           "directory or hub id if the config names it (repeatable; "
                                                           "default: only the embedded models)")) -> None:
    """Re-run one submitted cell from its recorded config and compare every metric."""
    from leaderboard.verify import describe, load_cell, report, rerun_config
    from leaderboard.verify import verify as run_verify

    with _user_errors(), tempfile.TemporaryDirectory(prefix="harness-verify-") as scratch:
        label, results = load_cell(file, cell)
        config = rerun_config(results, cache_dir or Path(scratch) / "cache", output_dir or Path(scratch) / "runs",
                              data_dir, device, tuple(allow_model or ()))
        console.print(f"Re-running {plain(label)}: {plain(describe(config))}")
        checks, directory = run_verify(results, config, tolerance, console)
        failed = [c for c in checks if not c.ok]
        Console().print(report(checks, tolerance, f"verify {label}"))
        if failed:
            console.print(f"[bold red]FAIL[/]: {len(failed)} of {len(checks)} checks differ (first: "
                          f"{plain(failed[0].name)}).")
            raise typer.Exit(code=1)
        console.print(f"[bold green]PASS[/]: all {len(checks)} checks within {tolerance:g}.")


def submit(path: Path = typer.Argument(..., help="a run directory, a sweep directory or a tree of runs"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="submission file (default: "
                                                                        "submission-<id>.tar.gz)")) -> None:
    """Package runs (results, configs, generations, the defence's plugin reference, sha256 checksums)
    into one submission file for `harness leaderboard add`."""
    from leaderboard.package import package

    with _user_errors():
        archive, manifest = package(path, out)
        defences = ", ".join(d["name"] for d in manifest["defences"])
        console.print(f"Submission [bold]{plain(archive)}[/] (id {plain(manifest['id'])}): {len(manifest['runs'])} "
                      f"run(s); defences: {plain(defences)}")
